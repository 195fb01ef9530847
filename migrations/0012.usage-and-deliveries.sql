-- Issue 15's shared foundation: the model's token counts per conversation, and what each
-- client connection to a conversation was sent (SPEC 10, "Deliveries").
-- depends: 0011.review-summaries

-- Set once, with the end. NULL while streaming or when nothing was counted.
-- `tokens_estimated`: the counts are sse-llm's estimate, the upstream reported none.
ALTER TABLE conversations
    ADD COLUMN prompt_tokens integer,
    ADD COLUMN completion_tokens integer,
    ADD COLUMN tokens_estimated boolean NOT NULL DEFAULT false;

-- One row per client connection to a conversation: the first POST /stream, each attach
-- and resume, each /v1 call, each dashboard live view. Written by the writer in its
-- batches (opened, then ended), never per chunk: last_seq is kept in memory meanwhile.
CREATE TABLE deliveries (
    id uuid PRIMARY KEY,
    conversation_id uuid NOT NULL,
    via text NOT NULL CHECK (via IN ('stream', 'attach', 'v1', 'dashboard')),
    -- The process serving the connection: its recovery marks open rows `lost`.
    instance_id uuid NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at timestamptz,
    from_seq integer NOT NULL,  -- the first chunk it could send (Last-Event-ID + 1)
    last_seq integer,           -- the last chunk it sent; NULL if none
    ended text CHECK (ended IN ('done', 'error', 'client_left', 'dropped', 'lost'))
);

CREATE INDEX deliveries_conversation_idx ON deliveries (conversation_id, started_at);
CREATE INDEX deliveries_open_idx ON deliveries (instance_id) WHERE ended IS NULL;
