-- The rollups' changes from the writer's statements appended as narrow deltas, folded
-- into conversation_stats within seconds, off the streaming path.
--
-- Migration 0013's triggers upserted the wide rollup row (180 bin columns) inside every
-- statement that creates or ends conversations: the writer's, which commits the chunks
-- beside them, so every chunk of that batch waited for it. Measured on one connection
-- (400 conversations of 60 chunks, one end a statement): an end took 1.45-1.60 ms with
-- the upsert, 1.01 ms with no trigger, 1.06 ms appending the two deltas here; a creation
-- 0.80 against 0.66 ms. In the streaming benchmark (C=100) the upsert was a third of the
-- database time issue 15 added.
--
-- Each delta is a conversation_stats_delta (0013): +1 for a row as it is now, -1 for it as
-- it was. fold_conversation_stats_pending() moves them into conversation_stats with 0013's
-- add_conversation_stats() (the same statement the triggers ran), and every process calls
-- it at each lease check (store.fold_pending_stats, one process at a time). Readers read
-- conversation_stats_live, the table plus the pending deltas pivoted, so a figure counts
-- from the commit of the statement that changed it, folded or not.
--
-- Deletes still upsert directly (pruning keeps the rollups and skips them; the writer
-- deletes only rows of a batch whose commit was lost): not the streaming path.
-- depends: 0020.vacuum-thresholds

CREATE TABLE conversation_stats_pending OF conversation_stats_delta;

-- The triggers keep their names and call the new functions; 0013's are kept, renamed,
-- for the rollback.
ALTER FUNCTION stats_created_conversations() RENAME TO stats_created_conversations_0013;
ALTER FUNCTION stats_changed_conversations() RENAME TO stats_changed_conversations_0019;

CREATE FUNCTION stats_created_conversations() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversation_stats_pending
    SELECT (v.delta).*
    FROM new_rows n
    CROSS JOIN LATERAL (VALUES (conversation_stats_delta(
        n, 1, coalesce(n.owner_id, '00000000-0000-0000-0000-000000000001')))) AS v(delta);
    RETURN NULL;
END
$$;

-- A change counts for the writer that owned the row before it (an end clears owner_id);
-- most updates (a cancel request, a compaction) change no counted column and add nothing.
CREATE FUNCTION stats_changed_conversations() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversation_stats_pending
    SELECT (v.delta).*
    FROM old_rows o JOIN new_rows n USING (id)
    CROSS JOIN LATERAL (VALUES
        (conversation_stats_delta(
            o, -1, coalesce(o.owner_id, '00000000-0000-0000-0000-000000000001'))),
        (conversation_stats_delta(
            n, 1, coalesce(o.owner_id, '00000000-0000-0000-0000-000000000001')))) AS v(delta)
    WHERE (o.status, o.model, o.provider, o.error_code, o.created_at, o.first_chunk_at,
           o.completed_at, o.chunk_count, o.prompt_tokens, o.completion_tokens,
           o.tokens_estimated)
          IS DISTINCT FROM
          (n.status, n.model, n.provider, n.error_code, n.created_at, n.first_chunk_at,
           n.completed_at, n.chunk_count, n.prompt_tokens, n.completion_tokens,
           n.tokens_estimated);
    -- A reviewed conversation's review figures move with its status (rare: reviews of
    -- streaming conversations, repairs): a key probe per change, as in 0019.
    IF (SELECT count(*) FROM new_rows n JOIN old_rows o USING (id)
        CROSS JOIN LATERAL (SELECT 1 FROM review_summaries s
                            WHERE s.conversation_id = n.id) AS r
        WHERE (o.status, o.model, o.provider)
              IS DISTINCT FROM (n.status, n.model, n.provider)) > 0 THEN
        UPDATE review_summaries s
        SET status = n.status, model = n.model, provider = n.provider
        FROM new_rows n
        WHERE s.conversation_id = n.id
          AND (s.status, s.model, s.provider) IS DISTINCT FROM (n.status, n.model, n.provider);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER conversations_stats_on_insert ON conversations;
DROP TRIGGER conversations_stats_on_update ON conversations;
CREATE TRIGGER conversations_stats_on_insert AFTER INSERT ON conversations
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stats_created_conversations();
CREATE TRIGGER conversations_stats_on_update AFTER UPDATE ON conversations
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stats_changed_conversations();

-- Moves up to `most` deltas into conversation_stats; returns how many. The caller holds
-- the fold's advisory lock (store.fold_pending_stats), so folds never run side by side.
CREATE FUNCTION fold_conversation_stats_pending(most integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    deltas conversation_stats_delta[];
BEGIN
    WITH moved AS (
        DELETE FROM conversation_stats_pending
        WHERE ctid = ANY(ARRAY(SELECT ctid FROM conversation_stats_pending LIMIT most))
        RETURNING *
    )
    SELECT array_agg(ROW(moved.*)::conversation_stats_delta) INTO deltas FROM moved;
    IF deltas IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM add_conversation_stats(deltas);
    RETURN cardinality(deltas);
END
$$;

-- conversation_stats as a reader must see it: its rows and the pending deltas, pivoted
-- as add_conversation_stats() would add them (grouped by bin first: 180 filters a group,
-- not a delta), in the table's column types. A reader's bucket, model and status
-- conditions reach the pending table's scan through both GROUP BYs.
DO $migration$
DECLARE
    names text;   -- t0, ..., t89, d0, ..., d89
    pivots text;  -- nullif(sum(sign) FILTER (WHERE ttfc_bin = 0), 0)::integer, ...
BEGIN
    SELECT string_agg(h || k, ', ' ORDER BY h DESC, k),
           string_agg(format('nullif(sum(sign) FILTER (WHERE %s = %s), 0)::integer',
                             CASE h WHEN 't' THEN 'ttfc_bin' ELSE 'duration_bin' END, k),
                      ', ' ORDER BY h DESC, k)
    INTO names, pivots
    FROM unnest(ARRAY['t', 'd']) AS h, generate_series(0, 89) AS k;

    EXECUTE format($$
        CREATE VIEW conversation_stats_live AS
        SELECT bucket, model, provider, status, error_code, writer, conversations, ended,
               chunks, prompt_tokens, completion_tokens, tokens_estimated, %1$s
        FROM conversation_stats
        UNION ALL
        SELECT bucket, model, provider, status, error_code, writer, sum(sign)::bigint,
               coalesce(sum(sign) FILTER (WHERE ended), 0)::bigint,
               coalesce(sum(chunks), 0)::bigint, coalesce(sum(prompt_tokens), 0)::bigint,
               coalesce(sum(completion_tokens), 0)::bigint,
               coalesce(sum(sign) FILTER (WHERE tokens_estimated), 0)::bigint, %2$s
        FROM (SELECT bucket, model, provider, status, error_code, writer, ended,
                     tokens_estimated, ttfc_bin, duration_bin, sum(sign) AS sign,
                     sum(sign * chunks) AS chunks, sum(sign * prompt_tokens) AS prompt_tokens,
                     sum(sign * completion_tokens) AS completion_tokens
              FROM conversation_stats_pending
              GROUP BY bucket, model, provider, status, error_code, writer, ended,
                       tokens_estimated, ttfc_bin, duration_bin) AS d
        GROUP BY bucket, model, provider, status, error_code, writer$$, names, pivots);
END
$migration$;

-- rebuild_conversation_stats() (0013, 0017) recounts from the conversations: what is
-- pending is in them already.
ALTER FUNCTION rebuild_conversation_stats() RENAME TO rebuild_conversation_stats_0017;
CREATE FUNCTION rebuild_conversation_stats() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE conversation_stats_pending;
    PERFORM rebuild_conversation_stats_0017();
END
$$;
