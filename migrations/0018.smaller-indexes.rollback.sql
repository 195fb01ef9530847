ALTER TABLE chunks RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold);
DROP INDEX conversations_status_newest_idx;
CREATE INDEX conversations_status_newest_idx ON conversations (status, created_at DESC, id DESC);
ALTER INDEX conversations_search_idx RESET (fastupdate);
