-- Back to 0013's conditions (EXISTS), rewritten in the function's stored source.
DO $migration$
DECLARE
    after text := pg_get_functiondef('stats_changed_conversations()'::regprocedure);
BEGIN
    after := regexp_replace(after,
        'IF \(SELECT count\(\*\) FROM old_rows o JOIN new_rows n USING \(id\) WHERE (.*?n\.tokens_estimated\))\) = 0 THEN',
        'IF NOT EXISTS (SELECT 1 FROM old_rows o JOIN new_rows n USING (id) WHERE \1) THEN');
    after := regexp_replace(after,
        'IF \(SELECT count\(\*\) FROM new_rows n JOIN old_rows o USING \(id\)(.*?IS DISTINCT FROM \(n\.status, n\.model, n\.provider\))\) > 0 THEN',
        'IF EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o USING (id)\1) THEN');
    EXECUTE after;
END
$migration$;
