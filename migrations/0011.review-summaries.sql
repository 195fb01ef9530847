-- Per conversation, its reviews counted: how many, and how many of each verdict and label.
-- Agreement (SPEC 9) is then a small aggregate over the conversations with 2+ reviews,
-- instead of reading and grouping every review of the slice (which grows with reviews).
--
-- Kept by statement-level triggers on reviews, in the transaction of every statement that
-- writes reviews (a PUT, a DELETE, the cascade of a pruned conversation, SQL by hand).
-- A row exists while its conversation has a review (a count of 0 is deleted).
-- depends: 0007.reviews 0009.review-queue

CREATE TABLE review_summaries (
    conversation_id uuid PRIMARY KEY,
    conversation_created_at timestamptz NOT NULL,
    reviews integer NOT NULL,
    good integer NOT NULL,
    bad integer NOT NULL,
    unsure integer NOT NULL
);

-- Agreement reads only conversations judged twice or more, newest first for its ids.
CREATE INDEX review_summaries_judged_idx
    ON review_summaries (conversation_created_at DESC, conversation_id DESC)
    WHERE reviews >= 2;

-- The review queue walks reviews in its sample's order (migration 0009) when the slice
-- needs a review (a verdict, a label...): 100,000 reviews, not 1,000,000 conversations.
CREATE INDEX reviews_review_sample_idx
    ON reviews ((uuid_hash_extended(conversation_id, 0)), conversation_id);

CREATE TABLE review_label_counts (
    conversation_id uuid NOT NULL,
    label text NOT NULL,
    reviews integer NOT NULL,  -- the reviews of the conversation that give the label
    PRIMARY KEY (conversation_id, label)
);

-- One function per statement kind: a transition table exists only where its trigger
-- declares it. Each adds the new rows and takes away the old ones.
CREATE FUNCTION summarise_inserted_reviews() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO review_summaries AS s
        (conversation_id, conversation_created_at, reviews, good, bad, unsure)
    SELECT conversation_id, max(conversation_created_at), count(*),
           count(*) FILTER (WHERE verdict = 'good'), count(*) FILTER (WHERE verdict = 'bad'),
           count(*) FILTER (WHERE verdict = 'unsure')
    FROM new_rows GROUP BY conversation_id ORDER BY conversation_id
    ON CONFLICT (conversation_id) DO UPDATE SET
        reviews = s.reviews + excluded.reviews, good = s.good + excluded.good,
        bad = s.bad + excluded.bad, unsure = s.unsure + excluded.unsure;
    INSERT INTO review_label_counts AS l (conversation_id, label, reviews)
    SELECT n.conversation_id, x.label, count(*)
    FROM new_rows n, unnest(n.labels) AS x(label)
    GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (conversation_id, label) DO UPDATE SET reviews = l.reviews + excluded.reviews;
    RETURN NULL;
END
$$;

CREATE FUNCTION summarise_changed_reviews() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO review_summaries AS s
        (conversation_id, conversation_created_at, reviews, good, bad, unsure)
    SELECT d.conversation_id, max(d.conversation_created_at), sum(d.n),
           coalesce(sum(d.n) FILTER (WHERE d.verdict = 'good'), 0),
           coalesce(sum(d.n) FILTER (WHERE d.verdict = 'bad'), 0),
           coalesce(sum(d.n) FILTER (WHERE d.verdict = 'unsure'), 0)
    FROM (SELECT conversation_id, conversation_created_at, verdict, 1 AS n FROM new_rows
          UNION ALL
          SELECT conversation_id, conversation_created_at, verdict, -1 FROM old_rows) d
    GROUP BY d.conversation_id
    -- Most updates (a note edited) change no verdict: nothing to write.
    HAVING (sum(d.n), sum(d.n) FILTER (WHERE d.verdict = 'good'),
            sum(d.n) FILTER (WHERE d.verdict = 'bad'))
           IS DISTINCT FROM (0, 0, 0)
    ORDER BY d.conversation_id
    ON CONFLICT (conversation_id) DO UPDATE SET
        reviews = s.reviews + excluded.reviews, good = s.good + excluded.good,
        bad = s.bad + excluded.bad, unsure = s.unsure + excluded.unsure;
    INSERT INTO review_label_counts AS l (conversation_id, label, reviews)
    SELECT d.conversation_id, d.label, sum(d.n)
    FROM (SELECT r.conversation_id, x.label, 1 AS n FROM new_rows r, unnest(r.labels) x(label)
          UNION ALL
          SELECT r.conversation_id, x.label, -1 FROM old_rows r, unnest(r.labels) x(label)) d
    GROUP BY 1, 2 HAVING sum(d.n) <> 0 ORDER BY 1, 2
    ON CONFLICT (conversation_id, label) DO UPDATE SET reviews = l.reviews + excluded.reviews;
    DELETE FROM review_label_counts l USING old_rows o
    WHERE l.conversation_id = o.conversation_id AND l.reviews <= 0;
    DELETE FROM review_summaries s USING old_rows o
    WHERE s.conversation_id = o.conversation_id AND s.reviews <= 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION summarise_deleted_reviews() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE review_summaries s SET
        reviews = s.reviews - o.reviews, good = s.good - o.good,
        bad = s.bad - o.bad, unsure = s.unsure - o.unsure
    FROM (SELECT conversation_id, count(*) AS reviews,
                 count(*) FILTER (WHERE verdict = 'good') AS good,
                 count(*) FILTER (WHERE verdict = 'bad') AS bad,
                 count(*) FILTER (WHERE verdict = 'unsure') AS unsure
          FROM old_rows GROUP BY conversation_id) o
    WHERE s.conversation_id = o.conversation_id;
    UPDATE review_label_counts l SET reviews = l.reviews - o.reviews
    FROM (SELECT r.conversation_id, x.label, count(*) AS reviews
          FROM old_rows r, unnest(r.labels) x(label) GROUP BY 1, 2) o
    WHERE l.conversation_id = o.conversation_id AND l.label = o.label;
    DELETE FROM review_label_counts l USING old_rows o
    WHERE l.conversation_id = o.conversation_id AND l.reviews <= 0;
    DELETE FROM review_summaries s USING old_rows o
    WHERE s.conversation_id = o.conversation_id AND s.reviews <= 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER reviews_summarised_on_insert AFTER INSERT ON reviews
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION summarise_inserted_reviews();
CREATE TRIGGER reviews_summarised_on_update AFTER UPDATE ON reviews
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION summarise_changed_reviews();
CREATE TRIGGER reviews_summarised_on_delete AFTER DELETE ON reviews
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION summarise_deleted_reviews();

-- What is there already.
INSERT INTO review_summaries
    (conversation_id, conversation_created_at, reviews, good, bad, unsure)
SELECT conversation_id, max(conversation_created_at), count(*),
       count(*) FILTER (WHERE verdict = 'good'), count(*) FILTER (WHERE verdict = 'bad'),
       count(*) FILTER (WHERE verdict = 'unsure')
FROM reviews GROUP BY conversation_id;
INSERT INTO review_label_counts (conversation_id, label, reviews)
SELECT r.conversation_id, x.label, count(*)
FROM reviews r, unnest(r.labels) AS x(label)
GROUP BY 1, 2;
