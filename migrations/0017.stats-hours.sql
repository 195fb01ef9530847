-- The figures of every slice of an hour together, folded: GET /stats and /insights by
-- hour with no model or status (the default view) read one row per hour, not ~22 (one
-- per model x provider x status x error code). At 5,000,000 conversations 60 days of
-- hours were ~31,000 rows of 180 bins, ~60 ms of sums on an idle core and the most of
-- the request; now 1,440 rows and the few unfolded ones.
--
-- Kept by fold_conversation_stats() (replaced below: the same fold, plus these rows
-- from what it merges) and rebuild_conversation_stats() (which now ends by recomputing
-- them). Only folded figures are here: a reader adds the hourly rows not folded yet,
-- as for conversation_stats_daily, so nothing on the streaming path changes.
-- depends: 0016.retention

DO $migration$
DECLARE
    names text;        -- t0, ..., t89, d0, ..., d89
    definitions text;  -- t0 integer, ...
    additions text;
    sums text;
    figures text := 'conversations bigint NOT NULL, ended bigint NOT NULL,'
        ' chunks bigint NOT NULL, prompt_tokens bigint NOT NULL,'
        ' completion_tokens bigint NOT NULL, tokens_estimated bigint NOT NULL';
    figure_names text := 'conversations, ended, chunks, prompt_tokens, completion_tokens,'
        ' tokens_estimated';
    figure_sums text := 'sum(conversations), sum(ended), sum(chunks), sum(prompt_tokens),'
        ' sum(completion_tokens), sum(tokens_estimated)';
    figure_additions text := 'conversations = s.conversations + excluded.conversations,'
        ' ended = s.ended + excluded.ended, chunks = s.chunks + excluded.chunks,'
        ' prompt_tokens = s.prompt_tokens + excluded.prompt_tokens,'
        ' completion_tokens = s.completion_tokens + excluded.completion_tokens,'
        ' tokens_estimated = s.tokens_estimated + excluded.tokens_estimated';
    key text := 'bucket, model, provider, status, error_code';
BEGIN
    SELECT string_agg(h || k, ', ' ORDER BY h DESC, k),
           string_agg(h || k || ' integer', ', ' ORDER BY h DESC, k),
           string_agg(format('%1$s = nullif(coalesce(s.%1$s, 0) + coalesce(excluded.%1$s, 0), 0)',
                             h || k), ', ' ORDER BY h DESC, k),
           string_agg(format('nullif(sum(%s), 0)', h || k), ', ' ORDER BY h DESC, k)
    INTO names, definitions, additions, sums
    FROM unnest(ARRAY['t', 'd']) AS h, generate_series(0, 89) AS k;

    EXECUTE format($$
        CREATE TABLE conversation_stats_hours (
            bucket timestamptz PRIMARY KEY,  -- the UTC hour of created_at
            %s, %s)$$,
        figures, definitions);

    -- 0013's fold, and the merged rows' sums by hour into conversation_stats_hours.
    EXECUTE format($$
        CREATE OR REPLACE FUNCTION fold_conversation_stats() RETURNS bigint
        LANGUAGE sql AS $body$
            WITH moved AS (
                DELETE FROM conversation_stats
                WHERE writer <> '00000000-0000-0000-0000-000000000000'
                  AND bucket < date_trunc('hour', now(), 'UTC') - interval '1 hour'
                RETURNING *
            ), hourly AS (
                INSERT INTO conversation_stats AS s (%1$s, writer, %2$s, %3$s)
                SELECT %1$s, '00000000-0000-0000-0000-000000000000', %4$s, %5$s
                FROM moved GROUP BY %1$s ORDER BY %1$s
                ON CONFLICT (%1$s, writer) DO UPDATE SET %6$s, %7$s
            ), daily AS (
                INSERT INTO conversation_stats_daily AS s (%1$s, %2$s, %3$s)
                SELECT date_trunc('day', bucket, 'UTC'), model, provider, status, error_code,
                       %4$s, %5$s
                FROM moved GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
                ON CONFLICT (%1$s) DO UPDATE SET %6$s, %7$s
            ), hours AS (
                INSERT INTO conversation_stats_hours AS s (bucket, %2$s, %3$s)
                SELECT bucket, %4$s, %5$s
                FROM moved GROUP BY bucket ORDER BY bucket
                ON CONFLICT (bucket) DO UPDATE SET %6$s, %7$s
            )
            SELECT count(*) FROM moved;
        $body$ $$, key, figure_names, names, figure_sums, sums, figure_additions, additions);

    -- The rebuild of 0013, then these rows from its (wholly folded) hourly rows.
    ALTER FUNCTION rebuild_conversation_stats() RENAME TO rebuild_conversation_stats_slices;
    EXECUTE format($$
        CREATE FUNCTION rebuild_conversation_stats() RETURNS void LANGUAGE plpgsql AS $body$
        BEGIN
            PERFORM rebuild_conversation_stats_slices();
            TRUNCATE conversation_stats_hours;
            INSERT INTO conversation_stats_hours (bucket, %1$s, %2$s)
            SELECT bucket, %3$s, %4$s FROM conversation_stats
            WHERE writer = '00000000-0000-0000-0000-000000000000'
            GROUP BY bucket;
        END
        $body$ $$, figure_names, names, figure_sums, sums);

    -- What is folded already.
    EXECUTE format($$
        INSERT INTO conversation_stats_hours (bucket, %1$s, %2$s)
        SELECT bucket, %3$s, %4$s FROM conversation_stats
        WHERE writer = '00000000-0000-0000-0000-000000000000'
        GROUP BY bucket$$, figure_names, names, figure_sums, sums);
END
$migration$;
