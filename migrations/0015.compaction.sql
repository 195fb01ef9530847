-- Compact storage (issue 15, point 6): once a conversation has ended, its chunk rows are
-- folded into `chunk_layout` beside `response` by sse_llm/compaction.py, and deleted.
-- depends: 0012.usage-and-deliveries

-- The chunk boundaries and times of an ended conversation (format: sse_llm/chunk_layout.py):
-- a version byte, then per chunk its length in characters and its time (ms since the
-- previous chunk's, the first's since created_at) as varints: ~2 bytes a chunk, where a
-- chunk row costs ~127 (int4[] arrays of the same cost 24 + 4 bytes a chunk each).
-- Layout version 0: the chunks are kept as rows on purpose (they did not match
-- `response`; compaction.py logs it once). No layout: its chunks, if any, are rows.
-- A table of its own, insert-only, rather than a column of conversations: filling a
-- column rewrites the conversation's row, and where its page has no room (a bulk-loaded
-- or busy table) the new version takes a new entry in each of its 7 indexes; measured,
-- that doubled conversations on disk. Here a layout costs its row and one b-tree entry.
CREATE TABLE chunk_layouts (
    conversation_id uuid PRIMARY KEY REFERENCES conversations (id) ON DELETE CASCADE,
    layout bytea NOT NULL
);

-- The stored `search` vector stays (~620 bytes a row for a 430-character answer): an
-- expression index instead made a search for a rare word recompute the vector of every
-- row of the newest window, ~1 s at 1,000,000 conversations (measured), where the stored
-- vector is read.
