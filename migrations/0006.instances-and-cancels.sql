-- Each process's instance lock (see sse_llm/lease.py) is recorded with the start time of
-- the server it was taken on: recovery can then tell a process that died (its lock was
-- taken on this very server and is free now) from one that has not yet re-taken its lock
-- after a restart of PostgreSQL, which drops every lock. A cancel is recorded in its
-- conversation, so a process that missed the notification still acts on it.
-- depends: 0003.openai-messages

CREATE TABLE instances (
    id uuid PRIMARY KEY,
    server_started_at timestamptz NOT NULL,  -- pg_postmaster_start_time() when locked
    locked_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE conversations ADD COLUMN cancel_requested_at timestamptz;
