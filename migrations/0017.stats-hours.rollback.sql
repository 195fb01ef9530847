-- Back to 0013's fold and rebuild.
DROP FUNCTION rebuild_conversation_stats();
ALTER FUNCTION rebuild_conversation_stats_slices() RENAME TO rebuild_conversation_stats;

DO $migration$
DECLARE
    names text;
    additions text;
    sums text;
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
           string_agg(format('%1$s = nullif(coalesce(s.%1$s, 0) + coalesce(excluded.%1$s, 0), 0)',
                             h || k), ', ' ORDER BY h DESC, k),
           string_agg(format('nullif(sum(%s), 0)', h || k), ', ' ORDER BY h DESC, k)
    INTO names, additions, sums
    FROM unnest(ARRAY['t', 'd']) AS h, generate_series(0, 89) AS k;
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
            )
            SELECT count(*) FROM moved;
        $body$ $$, key, figure_names, names, figure_sums, sums, figure_additions, additions);
END
$migration$;

DROP TABLE conversation_stats_hours;
