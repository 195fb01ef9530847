-- The service's whole history: one row per conversation, one row per streamed chunk.
-- depends:

CREATE TABLE conversations (
    id uuid PRIMARY KEY,
    prompt text NOT NULL,
    -- Filled once, when the generation ends: rewriting it per chunk would cost O(n^2)
    -- bytes for a long answer. While streaming, readers assemble it from chunks.
    response text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'streaming'
        CHECK (status IN ('streaming', 'completed', 'failed', 'cancelled', 'interrupted')),
    created_at timestamptz NOT NULL DEFAULT now(),
    first_chunk_at timestamptz,
    completed_at timestamptz,
    model text NOT NULL,
    provider text NOT NULL,
    chunk_count integer NOT NULL DEFAULT 0,
    error_code text,
    error_message text,
    -- The service instance generating it while `streaming` (see sse_llm/lease.py).
    owner_id uuid,
    -- Bounded inputs keep the tsvector under PostgreSQL's 1 MB limit for huge answers.
    search tsvector GENERATED ALWAYS AS (
        to_tsvector('english'::regconfig, left(prompt, 100000) || ' ' || left(response, 400000))
    ) STORED
);

CREATE INDEX conversations_newest_idx ON conversations (created_at DESC, id DESC);
CREATE INDEX conversations_status_newest_idx ON conversations (status, created_at DESC, id DESC);
CREATE INDEX conversations_search_idx ON conversations USING gin (search);
CREATE INDEX conversations_streaming_owner_idx ON conversations (owner_id) WHERE status = 'streaming';

-- Append-only: a chunk is written once, before any client sees it, and never changed.
CREATE TABLE chunks (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq integer NOT NULL CHECK (seq > 0),
    text text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, seq)
);
