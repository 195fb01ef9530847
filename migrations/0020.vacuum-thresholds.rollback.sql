ALTER TABLE conversations RESET (
    autovacuum_vacuum_threshold, autovacuum_vacuum_insert_threshold, autovacuum_analyze_threshold
);
ALTER TABLE chunks RESET (autovacuum_analyze_scale_factor, autovacuum_analyze_threshold);
