-- Browser sessions (SPEC 8), kept here so that every replica sees a sign-out at once.
-- The cookie's token is never stored: only its keyed SHA-256 (sse_llm/access.py).
-- depends: 0003.openai-messages

CREATE TABLE sessions (
    token_hash bytea PRIMARY KEY,
    reviewer text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);

-- Sign-ins delete expired rows oldest first through this index.
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);
