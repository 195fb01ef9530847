-- Compact storage (issue 15, point 6): once a conversation has ended, its chunk rows are
-- folded into `chunk_layout` beside `response` by sse_llm/compaction.py, and deleted.
-- depends: 0012.usage-and-deliveries

-- The chunk boundaries and times of an ended conversation (format: sse_llm/chunk_layout.py):
-- a version byte, then per chunk its length in characters and its time (ms since the
-- previous chunk's, the first's since created_at) as varints: ~2 bytes a chunk, where a
-- chunk row costs ~127 (int4[] arrays of the same would cost 24 + 4 bytes a chunk each).
-- NULL: its chunks, if any, are rows. Version 0: kept as rows on purpose (they did not
-- match `response`; compaction.py logs it once).
ALTER TABLE conversations ADD COLUMN chunk_layout bytea;
