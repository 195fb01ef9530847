-- The rollups' UPDATE trigger in linear time for big statements.
--
-- stats_changed_conversations() (migration 0013) asked `EXISTS (... old_rows JOIN
-- new_rows ...)` twice: whether any row changed a rolled-up column, and whether a changed
-- one is reviewed. For EXISTS the planner wants the first row fast and joins the two
-- transition tables by a nested loop; when no row matches (an UPDATE of many rows that
-- changes none of those columns: a backfill of delivery_cut, an operator's fix) it reads
-- every pair. Measured: 4,000 rows 3.6 s, 8,000 13.4 s; seeding 10,000,000 conversations
-- the marking of ~400,000 cut-off ones ran 27 minutes before it was stopped. As counts,
-- the same questions are planned for every row, a hash join past a few rows; the writer's
-- batches (20 rows) cost the same. The function was generated from templates; only these
-- two conditions change, rewritten in its stored source, and the rewrite is checked.
-- depends: 0018.smaller-indexes

DO $migration$
DECLARE
    before text := pg_get_functiondef('stats_changed_conversations()'::regprocedure);
    after text := before;
BEGIN
    after := regexp_replace(after,
        'IF NOT EXISTS \(SELECT 1 FROM old_rows o JOIN new_rows n USING \(id\) WHERE (.*?n\.tokens_estimated\))\) THEN',
        'IF (SELECT count(*) FROM old_rows o JOIN new_rows n USING (id) WHERE \1) = 0 THEN');
    after := regexp_replace(after,
        'IF EXISTS \(SELECT 1 FROM new_rows n JOIN old_rows o USING \(id\)(.*?IS DISTINCT FROM \(n\.status, n\.model, n\.provider\))\) THEN',
        'IF (SELECT count(*) FROM new_rows n JOIN old_rows o USING (id)\1) > 0 THEN');
    IF after LIKE '%EXISTS (SELECT 1 FROM old_rows o JOIN%'
       OR after LIKE '%EXISTS (SELECT 1 FROM new_rows n JOIN%'
       OR after NOT LIKE '%count(*) FROM old_rows o JOIN new_rows n USING (id) WHERE%) = 0 THEN%'
       OR after NOT LIKE '%count(*) FROM new_rows n JOIN old_rows o USING (id)%) > 0 THEN%' THEN
        RAISE EXCEPTION 'stats_changed_conversations() is not the function migration 0013 made';
    END IF;
    EXECUTE after;
END
$migration$;
