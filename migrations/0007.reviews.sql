-- Reviews and passage annotations (SPEC 9): reviewers' judgements of conversations.
-- Nothing on the streaming path writes or reads these tables.
-- depends: 0004.sessions 0005.chunks-without-foreign-key 0006.instances-and-cancels

CREATE TABLE reviews (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    reviewer text NOT NULL CHECK (char_length(reviewer) BETWEEN 1 AND 64),
    verdict text NOT NULL CHECK (verdict IN ('good', 'bad', 'unsure')),
    labels text[] NOT NULL DEFAULT '{}' CHECK (cardinality(labels) <= 20),
    note text NOT NULL DEFAULT '' CHECK (char_length(note) <= 4000),
    -- The conversation's created_at, copied (it never changes): the history's filters
    -- walk reviews in the history's order (newest conversation first) by index.
    conversation_created_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, reviewer)
);

CREATE INDEX reviews_verdict_idx
    ON reviews (verdict, conversation_created_at DESC, conversation_id DESC);
CREATE INDEX reviews_reviewer_idx
    ON reviews (reviewer, conversation_created_at DESC, conversation_id DESC);
CREATE INDEX reviews_order_idx ON reviews (conversation_created_at DESC, conversation_id DESC);
CREATE INDEX reviews_labels_idx ON reviews USING gin (labels);

CREATE TABLE annotations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    reviewer text NOT NULL CHECK (char_length(reviewer) BETWEEN 1 AND 64),
    field text NOT NULL CHECK (field IN ('prompt', 'response')),
    -- Offsets in Unicode code points into the stored text, end exclusive.
    start_offset integer NOT NULL CHECK (start_offset >= 0),
    end_offset integer NOT NULL CHECK (end_offset > start_offset),
    label text NOT NULL CHECK (char_length(label) BETWEEN 1 AND 40),
    note text NOT NULL DEFAULT '' CHECK (char_length(note) <= 4000),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX annotations_conversation_idx ON annotations (conversation_id, start_offset);

-- The review queue's soft claims: the conversation a reviewer was just served, so that a
-- colleague working the same slice is served another one until the claim expires.
CREATE TABLE review_claims (
    conversation_id uuid PRIMARY KEY REFERENCES conversations (id) ON DELETE CASCADE,
    reviewer text NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE INDEX review_claims_reviewer_idx ON review_claims (reviewer);
