-- Retention (SPEC 10): what pruning deleted, by hour x model x provider x status.
--
-- A prune transaction sets `sse_llm.keep_rollups`, so the rollups' delete triggers keep
-- the pruned periods' figures (/stats and /insights still show them). The history page's
-- per-status counts describe the conversations it can list, though: they are the rollup
-- minus this table (history_queries.count_by_status), exact whatever the cut-off, and
-- with reviewed conversations kept past it. Written only by the pruner, one at a time
-- (sse_llm/retention.py): no row is contended.
-- depends: 0012.usage-and-deliveries

CREATE TABLE pruned_counts (
    bucket timestamptz NOT NULL,  -- the UTC hour of created_at, as in conversation_counts
    model text NOT NULL,
    provider text NOT NULL,
    status text NOT NULL,
    conversations bigint NOT NULL,
    PRIMARY KEY (bucket, model, provider, status)
);
