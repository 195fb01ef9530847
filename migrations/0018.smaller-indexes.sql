-- Two indexes of conversations made smaller, for the storage target (issue 15, point 6:
-- at most 2.5 KB on disk per ended 60-chunk answer). Measured on 20,000 ended answers
-- of ~430 characters inserted 20 at a time, as the writer ends them.
-- depends: 0017.stats-hours

-- The search index took 391 bytes a row, against 185 when each row's lexemes go straight
-- into the index (fastupdate off). With fastupdate on, new entries wait in a pending list
-- that is merged later in bulk, and those merges leave the index half empty; a merge
-- also runs inside whichever insert finds the list full, here the writer's batch that
-- ends answers, which then stalls the streams it serves. Without the list each end
-- batch pays its own entries (~40 a conversation) and nothing else.
ALTER INDEX conversations_search_idx SET (fastupdate = off);
-- Entries already pending are merged now (PERFORM: yoyo would print a SELECT's result).
DO $$ BEGIN PERFORM gin_clean_pending_list('conversations_search_idx'::regclass); END $$;

-- 91% of conversations complete, and a filter on `completed` finds its page by walking
-- the newest rows (nine in ten match); the index serves the rare statuses, whose pages
-- it finds at any size of the history. Indexing only those takes ~10 bytes a row, not
-- 103. The filter says `status <> 'completed'` literally beside its bound parameter
-- (history_filters.py), so that a prepared, generic plan can still use this index.
DROP INDEX conversations_status_newest_idx;
CREATE INDEX conversations_status_newest_idx ON conversations (status, created_at DESC, id DESC)
    WHERE status <> 'completed';

-- `chunks` is a queue: a row lives from its chunk until the fold a few seconds after its
-- conversation ends (compaction.py). Freed space is reused only after autovacuum has
-- passed, so the table is as large as what arrives between two passes. By default a pass
-- waits for dead rows of a fifth of the table's last live count, which a backlog being
-- folded makes large; a fixed threshold vacuums it at every pass that has work.
ALTER TABLE chunks SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);
