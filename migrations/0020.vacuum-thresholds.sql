-- Autovacuum thresholds for the two tables whose passes stood beside the streams, now
-- that the embedded server looks every 10 s (database.EMBEDDED_SETTINGS: `chunks` is a
-- queue, and its space is reused only once a pass has been). Measured in the streaming
-- benchmark (C=100, a fresh database): with the compactor on or off alike, chunk p99 was
-- 11-12 ms at the default 60 s, 15-19 ms at 10 s, and 13-14 ms with these settings.
-- depends: 0019.rollup-trigger-joins

-- `chunks` changes by the thousand rows a second, so by default it was also ANALYZEd at
-- every pass (50 rows + a tenth of the table): up to 30,000 rows sampled, for statistics
-- whose shape never changes (a conversation's ~50 chunks, found by the primary key).
-- Once per million changed rows (minutes, on a busy server) is plenty.
ALTER TABLE chunks SET (autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 1000000);

-- A pass over `conversations` reads all of its 7 indexes (the search's GIN included)
-- whatever the number of dead rows, so a young table (under 100,000 rows, where a fifth is
-- small) was vacuumed at every pass for a few thousand. At 100,000 rows and more the
-- default share (a fifth of the table) asks for as many or more: nothing changes there.
ALTER TABLE conversations SET (
    autovacuum_vacuum_threshold = 20000,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_threshold = 10000
);
