-- The figures of GET /stats (SPEC 10) as rollups, so a chart over a year never reads the
-- conversations table: per UTC hour x model x provider x status x error code x writer,
-- how many conversations, and for the ended ones their chunks, tokens and two
-- histograms (time to first chunk, duration); and per hour x model x provider x status
-- of the conversation, its review figures.
--
-- Histogram: fixed log-spaced bins, four per doubling, over milliseconds. Bin 0 holds
-- values under 1 ms; bin k (1..88) holds [2^((k-1)/4), 2^(k/4)) ms; bin 89 holds 2^22 ms
-- (70 minutes) and more. A percentile is read as the geometric middle of the bin holding
-- its rank, so it is within a factor 2^(1/8) of the true (nearest-rank) value: a relative
-- error of at most 9.05% between 1 ms and 70 minutes (under 1 ms: reported as 0; over
-- 70 minutes: reported as 70 minutes). One integer column per bin (t0..t89 for time to
-- first chunk, d0..d89 for duration), NULL for an empty bin: a NULL costs one bit of the
-- row's null bitmap, and merging is sum() per column, the fastest aggregate PostgreSQL
-- has (measured against integer[] histograms merged by unnest: 30x slower).
--
-- Kept true like conversation_counts (0010): statement-level triggers, once per
-- statement (a writer batch, a recovery sweep, a repair, a review edit, SQL by hand),
-- never per chunk. Figures other than `conversations` count ended conversations only
-- (status <> 'streaming'), so a streaming row changes nothing until its end. `writer`
-- is the row's owner before the change (an ownerless row: writer ...01); writer 0 holds
-- only what fold_conversation_stats() merged, run by store.fold_counts under the lease.
-- The fold adds what it merges into conversation_stats_daily too, so a day's figures are
-- its daily row plus the unfolded rows of its hours (a few): a year by day reads ~400
-- rows per slice, not 8,760.
--
-- Pruning keeps rollups: every DELETE trigger here (and conversation_counts' own) does
-- nothing in a transaction that ran SET LOCAL sse_llm.keep_rollups = 'on'.
-- depends: 0012.usage-and-deliveries

-- Its argument is named once, so the planner inlines it (a call per row cost a writer
-- batch more than the rest of its triggers, measured); under 1 ms the floor is <= 0.
CREATE FUNCTION stats_bin(milliseconds double precision) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN greatest(0, least(
    floor(4 * ln(greatest(milliseconds, 0.001)) / ln(2::double precision))::integer + 1, 89));

-- One conversation's share of the figures, with a sign (+1 added, -1 taken away):
-- conversation_stats_delta(), below, and the triggers compute it.
CREATE TYPE conversation_stats_delta AS (
    bucket timestamptz, model text, provider text, status text, error_code text,
    writer uuid, sign integer, ended boolean, chunks integer, prompt_tokens integer,
    completion_tokens integer, tokens_estimated boolean, ttfc_bin integer, duration_bin integer
);

-- The tables and the functions that name every bin column are written by this block,
-- from the one bin count, so the 180 columns cannot drift apart.
DO $migration$
DECLARE
    names text;        -- t0, ..., t89, d0, ..., d89
    definitions text;  -- t0 integer, ...
    pivots text;       -- each bin's signed count among deltas
    additions text;    -- t0 = nullif(coalesce(s.t0, 0) + coalesce(excluded.t0, 0), 0), ...
    sums text;         -- nullif(sum(t0), 0), ...
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
           string_agg(format('nullif(sum(sign) FILTER (WHERE %s = %s), 0)',
                             CASE h WHEN 't' THEN 'ttfc_bin' ELSE 'duration_bin' END, k),
                      ', ' ORDER BY h DESC, k),
           string_agg(format('%1$s = nullif(coalesce(s.%1$s, 0) + coalesce(excluded.%1$s, 0), 0)',
                             h || k), ', ' ORDER BY h DESC, k),
           string_agg(format('nullif(sum(%s), 0)', h || k), ', ' ORDER BY h DESC, k)
    INTO names, definitions, pivots, additions, sums
    FROM unnest(ARRAY['t', 'd']) AS h, generate_series(0, 89) AS k;

    EXECUTE format($$
        CREATE TABLE conversation_stats (
            bucket timestamptz NOT NULL,  -- the UTC hour of created_at
            model text NOT NULL, provider text NOT NULL, status text NOT NULL,
            error_code text NOT NULL,     -- '' for none
            writer uuid NOT NULL,
            %s, %s,
            PRIMARY KEY (bucket, model, provider, status, error_code, writer))$$,
        figures, definitions);
    EXECUTE format($$
        CREATE TABLE conversation_stats_daily (
            bucket timestamptz NOT NULL,  -- the UTC day of created_at
            model text NOT NULL, provider text NOT NULL, status text NOT NULL,
            error_code text NOT NULL,
            %s, %s,
            PRIMARY KEY (bucket, model, provider, status, error_code))$$,
        figures, definitions);

    -- The statements that add signed deltas (any number, any keys) from {source}: the
    -- short one when no delta is of an ended conversation (a batch of creations), the
    -- long one with the bins (its cost is the executor's setup of ~1,300 expressions).
    CREATE TEMPORARY TABLE stats_statements (light text, wide text) ON COMMIT DROP;
    INSERT INTO stats_statements VALUES (
        format($$
            INSERT INTO conversation_stats AS s (%1$s, writer, %2$s)
            SELECT %1$s, writer, sum(sign), 0, 0, 0, 0, 0
            FROM {source}
            GROUP BY %1$s, writer ORDER BY %1$s, writer
            ON CONFLICT (%1$s, writer)
            DO UPDATE SET conversations = s.conversations + excluded.conversations$$,
            key, figure_names),
        format($$
            INSERT INTO conversation_stats AS s (%1$s, writer, %2$s, %3$s)
            SELECT %1$s, writer, sum(sign), coalesce(sum(sign) FILTER (WHERE ended), 0),
                   coalesce(sum(chunks), 0), coalesce(sum(prompt_tokens), 0),
                   coalesce(sum(completion_tokens), 0),
                   coalesce(sum(sign) FILTER (WHERE tokens_estimated), 0), %4$s
            FROM (SELECT %1$s, writer, ended, tokens_estimated, ttfc_bin, duration_bin,
                         sum(sign) AS sign, sum(sign * chunks) AS chunks,
                         sum(sign * prompt_tokens) AS prompt_tokens,
                         sum(sign * completion_tokens) AS completion_tokens
                  FROM {source}
                  GROUP BY %1$s, writer, ended, tokens_estimated, ttfc_bin, duration_bin) AS d
            GROUP BY %1$s, writer ORDER BY %1$s, writer
            ON CONFLICT (%1$s, writer) DO UPDATE SET %5$s, %6$s$$,
            key, figure_names, names, pivots, figure_additions, additions));

    EXECUTE (SELECT format($$
        CREATE FUNCTION add_conversation_stats(deltas conversation_stats_delta[])
        RETURNS void LANGUAGE plpgsql AS $body$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM unnest(deltas) WHERE ended) THEN
                %s;
            ELSE
                %s;
            END IF;
        END
        $body$ $$, replace(light, '{source}', 'unnest(deltas)'),
                   replace(wide, '{source}', 'unnest(deltas)'))
        FROM stats_statements);

    -- Merges other writers' rows of past hours into writer 0 and into the daily table;
    -- returns the rows merged.
    EXECUTE format($$
        CREATE FUNCTION fold_conversation_stats() RETURNS bigint LANGUAGE sql AS $body$
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

    -- Recomputes both tables from the conversations (the backfill; benchmarks' seeds).
    -- Grouped by bin first, then pivoted: 180 filters per group, not per conversation.
    EXECUTE format($$
        CREATE FUNCTION rebuild_conversation_stats() RETURNS void LANGUAGE plpgsql AS $body$
        BEGIN
            TRUNCATE conversation_stats, conversation_stats_daily;
            INSERT INTO conversation_stats (%1$s, writer, %2$s, %3$s)
            SELECT %1$s, '00000000-0000-0000-0000-000000000000',
                   sum(n), coalesce(sum(n) FILTER (WHERE ended), 0), coalesce(sum(chunks), 0),
                   coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
                   coalesce(sum(estimated), 0), %4$s
            FROM (
                SELECT (d).bucket, (d).model, (d).provider, (d).status, (d).error_code,
                       (d).ended, (d).ttfc_bin, (d).duration_bin, count(*) AS n,
                       sum((d).chunks) AS chunks,
                       sum((d).prompt_tokens) AS prompt_tokens,
                       sum((d).completion_tokens) AS completion_tokens,
                       count(*) FILTER (WHERE (d).tokens_estimated) AS estimated
                FROM (SELECT conversation_stats_delta(c, 1, NULL) AS d
                      FROM conversations c) AS each
                GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
            ) AS grouped
            GROUP BY %1$s;
            INSERT INTO conversation_stats_daily (%1$s, %2$s, %3$s)
            SELECT date_trunc('day', bucket, 'UTC'), model, provider, status, error_code,
                   %5$s, %6$s
            FROM conversation_stats GROUP BY 1, 2, 3, 4, 5;
        END
        $body$ $$, key, figure_names, names, replace(pivots, 'sum(sign)', 'sum(n)'),
        figure_sums, sums);
END
$migration$;

-- A day's unfolded rows (the last hours', late ends): found without reading the folded.
CREATE INDEX conversation_stats_unfolded_idx ON conversation_stats (bucket)
    WHERE writer <> '00000000-0000-0000-0000-000000000000';

-- The triggers. Changes by a row with no owner go to writer ...01 (never 0: writer 0 is
-- what the daily table already holds). Each trigger is one statement over its transition
-- tables, the row's delta written out inline: a function call per row, or deltas passed
-- as an array to add_conversation_stats(), cost a writer batch twice as much (measured).
DO $triggers$
DECLARE
    delta text := $delta$
        date_trunc('hour', {row}.created_at, 'UTC') AS bucket, {row}.model AS model,
        {row}.provider AS provider, {row}.status AS status,
        coalesce({row}.error_code, '') AS error_code, {writer} AS writer, {sign} AS sign,
        {row}.status <> 'streaming' AS ended,
        CASE WHEN {row}.status <> 'streaming' THEN {row}.chunk_count END AS chunks,
        CASE WHEN {row}.status <> 'streaming' THEN {row}.prompt_tokens END AS prompt_tokens,
        CASE WHEN {row}.status <> 'streaming' THEN {row}.completion_tokens END
            AS completion_tokens,
        {row}.status <> 'streaming' AND {row}.tokens_estimated AS tokens_estimated,
        CASE WHEN {row}.status <> 'streaming' AND {row}.first_chunk_at IS NOT NULL
             THEN stats_bin(extract(epoch FROM {row}.first_chunk_at - {row}.created_at)::float8
                            * 1000) END AS ttfc_bin,
        CASE WHEN {row}.status <> 'streaming' AND {row}.completed_at IS NOT NULL
             THEN stats_bin(extract(epoch FROM {row}.completed_at - {row}.created_at)::float8
                            * 1000) END AS duration_bin$delta$;
    ownerless text := $$coalesce(%s.owner_id, '00000000-0000-0000-0000-000000000001')$$;
    created text := replace(replace(replace(delta, '{row}', 'n'), '{sign}', '1'),
                            '{writer}', format(ownerless, 'n'));
    taken text := replace(replace(replace(delta, '{row}', 'o'), '{sign}', '-1'),
                          '{writer}', format(ownerless, 'o'));
    -- A change counts for the writer that owned the row before it (an end clears owner_id).
    changed text := replace(replace(replace(delta, '{row}', 'n'), '{sign}', '1'),
                            '{writer}', format(ownerless, 'o'));
    -- Most updates (a cancel request, a compaction) change no counted column.
    differs text := $$(o.status, o.model, o.provider, o.error_code, o.created_at,
                       o.first_chunk_at, o.completed_at, o.chunk_count, o.prompt_tokens,
                       o.completion_tokens, o.tokens_estimated)
                      IS DISTINCT FROM
                      (n.status, n.model, n.provider, n.error_code, n.created_at,
                       n.first_chunk_at, n.completed_at, n.chunk_count, n.prompt_tokens,
                       n.completion_tokens, n.tokens_estimated)$$;
    light text;
    wide text;
    source text;
BEGIN
    SELECT s.light, s.wide INTO light, wide FROM stats_statements s;

    -- The same delta as a function, for rebuild_conversation_stats().
    EXECUTE format($$
        CREATE FUNCTION conversation_stats_delta(c conversations, sign integer, writer uuid)
        RETURNS conversation_stats_delta LANGUAGE sql STABLE
        RETURN ROW(%s)::conversation_stats_delta$$,
        regexp_replace(replace(replace(replace(delta, '{row}', 'c'), '{sign}', 'sign'),
                               '{writer}', 'writer'), '\s+AS [a-z_]+', '', 'g'));

    source := format('(SELECT %s FROM new_rows n) AS each', created);
    EXECUTE format($$
        CREATE FUNCTION stats_created_conversations() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            IF EXISTS (SELECT 1 FROM new_rows WHERE status <> 'streaming') THEN
                %s;
            ELSE
                %s;
            END IF;
            RETURN NULL;
        END
        $body$ $$, replace(wide, '{source}', source), replace(light, '{source}', source));

    source := format($$(SELECT %s FROM old_rows o JOIN new_rows n USING (id) WHERE %s
                        UNION ALL
                        SELECT %s FROM old_rows o JOIN new_rows n USING (id) WHERE %s) AS each$$,
                     taken, differs, changed, differs);
    EXECUTE format($$
        CREATE FUNCTION stats_changed_conversations() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM old_rows o JOIN new_rows n USING (id) WHERE %s) THEN
                RETURN NULL;
            END IF;
            %s;
            -- A reviewed conversation's review figures move with its status (rare:
            -- reviews of streaming conversations, repairs): a key probe per change.
            IF EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o USING (id)
                       CROSS JOIN LATERAL (SELECT 1 FROM review_summaries s
                                           WHERE s.conversation_id = n.id) AS r
                       WHERE (o.status, o.model, o.provider)
                             IS DISTINCT FROM (n.status, n.model, n.provider)) THEN
                UPDATE review_summaries s
                SET status = n.status, model = n.model, provider = n.provider
                FROM new_rows n
                WHERE s.conversation_id = n.id
                  AND (s.status, s.model, s.provider)
                      IS DISTINCT FROM (n.status, n.model, n.provider);
            END IF;
            RETURN NULL;
        END
        $body$ $$, differs, replace(wide, '{source}', source));

    source := format('(SELECT %s FROM old_rows o) AS each', taken);
    EXECUTE format($$
        CREATE FUNCTION stats_deleted_conversations() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            IF current_setting('sse_llm.keep_rollups', true) = 'on' THEN
                RETURN NULL;  -- pruning: the pruned periods keep their figures
            END IF;
            IF EXISTS (SELECT 1 FROM old_rows WHERE status <> 'streaming') THEN
                %s;
            ELSE
                %s;
            END IF;
            RETURN NULL;
        END
        $body$ $$, replace(wide, '{source}', source), replace(light, '{source}', source));
END
$triggers$;

CREATE TRIGGER conversations_stats_on_insert AFTER INSERT ON conversations
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stats_created_conversations();
CREATE TRIGGER conversations_stats_on_update AFTER UPDATE ON conversations
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stats_changed_conversations();
CREATE TRIGGER conversations_stats_on_delete AFTER DELETE ON conversations
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stats_deleted_conversations();

-- 0010's delete trigger keeps the pruned periods' counts too.
CREATE OR REPLACE FUNCTION count_deleted_conversations() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('sse_llm.keep_rollups', true) = 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO conversation_counts AS counts
        (bucket, model, provider, status, writer, conversations)
    SELECT date_trunc('hour', created_at, 'UTC'), model, provider, status,
           coalesce(owner_id, '00000000-0000-0000-0000-000000000000'), -count(*)
    FROM old_rows GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (bucket, model, provider, status, writer)
    DO UPDATE SET conversations = counts.conversations + excluded.conversations;
    RETURN NULL;
END
$$;

-- Review figures. review_summaries (0011, one row per reviewed conversation) carries its
-- conversation's model, provider and status, so its rows alone say where they count, even
-- when the conversation is gone (a pruned conversation's reviews go by cascade).
-- reviewed = conversations with a review; good/bad/unsure = reviews with that verdict.
-- `writer` is the backend (pg_backend_pid()): two replicas' reviewers never wait on one
-- row; 0 is the folded rows, which review_counts_daily holds by day.
ALTER TABLE review_summaries
    ADD COLUMN model text, ADD COLUMN provider text, ADD COLUMN status text;

CREATE TABLE review_counts (
    bucket timestamptz NOT NULL,  -- the UTC hour of the conversation's created_at
    model text NOT NULL, provider text NOT NULL, status text NOT NULL,
    writer integer NOT NULL,
    reviewed bigint NOT NULL, good bigint NOT NULL, bad bigint NOT NULL,
    unsure bigint NOT NULL,
    PRIMARY KEY (bucket, model, provider, status, writer)
);

-- What the fold merged, by UTC day, as for conversation_stats_daily.
CREATE TABLE review_counts_daily (
    bucket timestamptz NOT NULL,
    model text NOT NULL, provider text NOT NULL, status text NOT NULL,
    reviewed bigint NOT NULL, good bigint NOT NULL, bad bigint NOT NULL,
    unsure bigint NOT NULL,
    PRIMARY KEY (bucket, model, provider, status)
);
CREATE INDEX review_counts_unfolded_idx ON review_counts (bucket) WHERE writer <> 0;

CREATE FUNCTION review_summary_of_conversation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT c.model, c.provider, c.status INTO NEW.model, NEW.provider, NEW.status
    FROM conversations c WHERE c.id = NEW.conversation_id;
    RETURN NEW;
END
$$;

-- Adds the rows of `added` and takes away those of `removed` (either may be empty).
CREATE FUNCTION add_review_counts(added review_summaries[], removed review_summaries[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO review_counts AS r
        (bucket, model, provider, status, writer, reviewed, good, bad, unsure)
    SELECT date_trunc('hour', d.conversation_created_at, 'UTC'), coalesce(d.model, ''),
           coalesce(d.provider, ''), coalesce(d.status, ''), pg_backend_pid(),
           sum(d.sign * (d.reviews > 0)::integer), sum(d.sign * d.good),
           sum(d.sign * d.bad), sum(d.sign * d.unsure)
    FROM (SELECT a.*, 1 AS sign FROM unnest(added) a
          UNION ALL
          SELECT o.*, -1 FROM unnest(removed) o) AS d
    GROUP BY 1, 2, 3, 4
    HAVING (sum(d.sign * (d.reviews > 0)::integer), sum(d.sign * d.good),
            sum(d.sign * d.bad), sum(d.sign * d.unsure)) IS DISTINCT FROM (0, 0, 0, 0)
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (bucket, model, provider, status, writer) DO UPDATE SET
        reviewed = r.reviewed + excluded.reviewed, good = r.good + excluded.good,
        bad = r.bad + excluded.bad, unsure = r.unsure + excluded.unsure;
END
$$;

CREATE FUNCTION count_inserted_review_summaries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM add_review_counts(ARRAY(SELECT n::review_summaries FROM new_rows n), '{}');
    RETURN NULL;
END
$$;

-- In a prune (keep_rollups on), review_summaries change only by the pruned reviews.
CREATE FUNCTION count_changed_review_summaries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('sse_llm.keep_rollups', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM add_review_counts(ARRAY(SELECT n::review_summaries FROM new_rows n), ARRAY(SELECT o::review_summaries FROM old_rows o));
    RETURN NULL;
END
$$;

CREATE FUNCTION count_deleted_review_summaries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('sse_llm.keep_rollups', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM add_review_counts('{}', ARRAY(SELECT o::review_summaries FROM old_rows o));
    RETURN NULL;
END
$$;

CREATE TRIGGER review_summaries_of_conversation BEFORE INSERT ON review_summaries
    FOR EACH ROW EXECUTE FUNCTION review_summary_of_conversation();
CREATE TRIGGER review_summaries_counted_on_insert AFTER INSERT ON review_summaries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_inserted_review_summaries();
CREATE TRIGGER review_summaries_counted_on_update AFTER UPDATE ON review_summaries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_changed_review_summaries();
CREATE TRIGGER review_summaries_counted_on_delete AFTER DELETE ON review_summaries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_deleted_review_summaries();

-- Merges the review counts' per-backend rows into writer 0 and into the daily table;
-- returns the rows merged.
CREATE FUNCTION fold_review_counts() RETURNS bigint LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM review_counts WHERE writer <> 0
        RETURNING bucket, model, provider, status, reviewed, good, bad, unsure
    ), hourly AS (
        INSERT INTO review_counts AS r
            (bucket, model, provider, status, writer, reviewed, good, bad, unsure)
        SELECT bucket, model, provider, status, 0, sum(reviewed), sum(good), sum(bad),
               sum(unsure)
        FROM moved GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (bucket, model, provider, status, writer) DO UPDATE SET
            reviewed = r.reviewed + excluded.reviewed, good = r.good + excluded.good,
            bad = r.bad + excluded.bad, unsure = r.unsure + excluded.unsure
    ), daily AS (
        INSERT INTO review_counts_daily AS r
            (bucket, model, provider, status, reviewed, good, bad, unsure)
        SELECT date_trunc('day', bucket, 'UTC'), model, provider, status, sum(reviewed),
               sum(good), sum(bad), sum(unsure)
        FROM moved GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (bucket, model, provider, status) DO UPDATE SET
            reviewed = r.reviewed + excluded.reviewed, good = r.good + excluded.good,
            bad = r.bad + excluded.bad, unsure = r.unsure + excluded.unsure
    )
    SELECT count(*) FROM moved;
$$;

CREATE FUNCTION rebuild_review_counts() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE review_summaries s SET model = c.model, provider = c.provider, status = c.status
    FROM conversations c
    WHERE c.id = s.conversation_id
      AND (s.model, s.provider, s.status) IS DISTINCT FROM (c.model, c.provider, c.status);
    TRUNCATE review_counts;
    INSERT INTO review_counts
        (bucket, model, provider, status, writer, reviewed, good, bad, unsure)
    SELECT date_trunc('hour', conversation_created_at, 'UTC'), coalesce(model, ''),
           coalesce(provider, ''), coalesce(status, ''), 0,
           count(*) FILTER (WHERE reviews > 0), sum(good), sum(bad), sum(unsure)
    FROM review_summaries GROUP BY 1, 2, 3, 4;
    TRUNCATE review_counts_daily;
    INSERT INTO review_counts_daily
        (bucket, model, provider, status, reviewed, good, bad, unsure)
    SELECT date_trunc('day', bucket, 'UTC'), model, provider, status, sum(reviewed),
           sum(good), sum(bad), sum(unsure)
    FROM review_counts GROUP BY 1, 2, 3, 4;
END
$$;

-- What is there already: no write may land between the backfill and this commit.
LOCK TABLE conversations, reviews, review_summaries IN SHARE MODE;
DO $$
BEGIN
    PERFORM rebuild_conversation_stats();
    PERFORM rebuild_review_counts();
END
$$;
