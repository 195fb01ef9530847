"""Seed reviews and annotations on a seeded history, in SQL (imported by seed_history.py).

~60% as many reviewed conversations as reviews, drawn at random from the ended ones,
each judged by 1, 2 or 3 of 12 reviewers (half, a third, a sixth: 1.67 reviews per
conversation on average, so agreement has 2- and 3-reviewer items). Each conversation
has a "true" verdict (good 60%, bad 25%, unsure 15%) that each of its reviewers gives
with probability 0.8 (else one of the three at random), and 0-3 "true" labels from 40
with a Zipf-like spread, each kept by each reviewer with probability 0.8: kappa is then
meaningful, neither 0 nor 1. Annotations (a fifth as many as reviews) mark short spans
of the response (or, one in five, the prompt) of reviewed conversations.

Then the `conversation_counts` rollup (migration 0010) and the /stats rollups (0013) are
rebuilt from the tables, as the migrations fill them: their triggers count the seeded
rows already, so this settles a database seeded by an older checkout and folds the
seed's rows into the daily tables (0.5 s and ~30 s on a million rows).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

REVIEWERS = [
    "alice", "bob", "chen", "dana", "emeka", "fatima", "gus", "hana", "ivan", "julia",
    "kofi", "lena",
]  # fmt: skip

# Most frequent first: a label's rank is ~ 39 * random()^3 (1/3 of draws are the first,
# under 1% the 39th); the 40th, "golden", is on 1 review in 2,000 only.
LABELS = [
    "helpful", "too-long", "hallucination", "off-topic", "formatting", "incomplete",
    "wrong-code", "refusal", "tone", "outdated", "repetitive", "unsafe", "verbose",
    "missing-sources", "math-error", "good-example", "ambiguous-prompt", "truncated",
    "wrong-language", "overconfident", "polite", "concise", "creative", "factual",
    "needs-followup", "jailbreak-attempt", "pii", "bias", "legal", "medical",
    "copyright", "spam", "translation", "summarization", "code-review", "sql",
    "regex", "poetry", "edge-case", "golden",
]  # fmt: skip

NOTES = [
    "", "", "", "Fine.", "Check the second paragraph.", "Answer drifts off topic.",
    "Good, but could be shorter.", "Wrong about the dates.", "Code does not compile.",
    "Refused for no reason.", "Nice example for the docs.", "Needs a second opinion.",
]  # fmt: skip

# The per-conversation draws: how many reviewers, which (a start and a step over the
# pool: distinct for k = 0, 1, 2 since 2 * step < 12), the true verdict and label count.
DRAWS_SQL = """
    CREATE UNLOGGED TABLE seed_reviewed AS
    SELECT c.id, c.created_at,
           CASE WHEN u.a < 0.5 THEN 1 WHEN u.a < 0.833 THEN 2 ELSE 3 END AS reviewers,
           floor(12 * u.b ^ 1.5)::int AS first,
           1 + floor(5 * u.c)::int AS step,
           CASE WHEN u.d < 0.60 THEN 'good' WHEN u.d < 0.85 THEN 'bad' ELSE 'unsure' END
               AS truth,
           floor(4 * u.e ^ 1.3)::int AS label_count
    FROM (
        SELECT id, created_at FROM conversations
        WHERE status <> 'streaming'
        ORDER BY md5(id::text)
        LIMIT %(reviewed)s
    ) AS c
    CROSS JOIN LATERAL (
        SELECT random() AS a, random() AS b, random() AS c, random() AS d, random() AS e,
               c.id AS correlate  -- a lateral subquery is re-run per row
    ) AS u
"""

# The true labels, drawn per conversation (the subquery refers to the row: re-run each).
TRUE_LABELS_SQL = """
    CREATE UNLOGGED TABLE seed_truth AS
    SELECT s.*,
           ARRAY(
               SELECT DISTINCT (%(labels)s::text[])[1 + floor(39 * random() ^ 3)::int]
               FROM generate_series(1, s.label_count)
           ) AS labels
    FROM seed_reviewed s
"""

REVIEWS_SQL = """
    INSERT INTO reviews
        (conversation_id, reviewer, verdict, labels, note, conversation_created_at,
         created_at, updated_at)
    SELECT s.id,
           (%(reviewers)s::text[])[1 + (s.first + k * s.step) %% 12],
           CASE WHEN random() < 0.8 THEN s.truth
                ELSE (ARRAY['good', 'bad', 'unsure'])[1 + floor(3 * random())::int] END,
           ARRAY(SELECT l FROM unnest(s.labels) AS l WHERE random() < 0.8 AND k >= 0)
               || CASE WHEN random() < 0.0005 THEN ARRAY['golden'] ELSE '{}' END,
           (%(notes)s::text[])[1 + floor(%(note_count)s * random())::int],
           s.created_at, w.at, w.at
    FROM seed_truth s
    CROSS JOIN LATERAL generate_series(0, s.reviewers - 1) AS k
    CROSS JOIN LATERAL (
        SELECT least(now(), s.created_at + random() * interval '20 days' + k * interval '1 h')
               AS at
    ) AS w
"""

ANNOTATIONS_SQL = """
    INSERT INTO annotations
        (conversation_id, reviewer, field, start_offset, end_offset, label, note)
    SELECT r.conversation_id, r.reviewer, r.field, f.start, f.start + f.span,
           (%(labels)s::text[])[1 + floor(39 * random() ^ 3)::int],
           (%(notes)s::text[])[1 + floor(%(note_count)s * random())::int]
    FROM (
        SELECT conversation_id, reviewer,
               CASE WHEN random() < 0.8 THEN 'response' ELSE 'prompt' END AS field
        -- Not ORDER BY random(): the plan would reuse that value in the CASE above.
        FROM reviews ORDER BY md5(conversation_id::text || reviewer) LIMIT %(count)s
    ) AS r
    JOIN conversations c ON c.id = r.conversation_id
    CROSS JOIN LATERAL (
        SELECT char_length(CASE WHEN r.field = 'response' THEN c.response ELSE c.prompt END)
               AS length
    ) AS t
    CROSS JOIN LATERAL (
        SELECT floor(random() * greatest(1, t.length - 60))::int AS start,
               least(t.length, 5 + floor(random() * 55)::int) AS span
    ) AS f
    WHERE f.span > 0
"""


COUNTS_SQL = """
    INSERT INTO conversation_counts (bucket, model, provider, status, writer, conversations)
    SELECT date_trunc('hour', created_at, 'UTC'), model, provider, status,
           '00000000-0000-0000-0000-000000000000', count(*)
    FROM conversations
    GROUP BY 1, 2, 3, 4
"""


def seed_reviews(database_url: str, reviews: int) -> dict[str, Any]:
    """Replace every review and annotation with `reviews` seeded ones (about); timings."""
    began = time.monotonic()
    params = {
        "reviewers": REVIEWERS,
        "labels": LABELS,
        "notes": NOTES,
        "note_count": len(NOTES),
        "reviewed": round(reviews * 0.6),
        "count": reviews // 5,
    }
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SELECT setseed(0.14)")
        conn.execute("TRUNCATE reviews, annotations, review_claims")
        conn.execute("DROP TABLE IF EXISTS seed_reviewed, seed_truth")
        for statement in (DRAWS_SQL, TRUE_LABELS_SQL, REVIEWS_SQL):
            conn.execute(statement, params)
        reviews_done = time.monotonic()
        conn.execute(ANNOTATIONS_SQL, params)
        conn.execute("DROP TABLE seed_reviewed, seed_truth")
        annotations_done = time.monotonic()
        rebuild_counts(conn)
        conn.execute("ANALYZE reviews")
        conn.execute("ANALYZE annotations")
        counted = conn.execute(
            """
            SELECT (SELECT count(*) FROM reviews),
                   (SELECT count(DISTINCT conversation_id) FROM reviews),
                   (SELECT count(*) FROM annotations)
            """
        ).fetchone()
    finished = time.monotonic()
    assert counted is not None
    return {
        "reviews": counted[0],
        "reviewed_conversations": counted[1],
        "annotations": counted[2],
        "seconds_reviews": round(reviews_done - began, 1),
        "seconds_annotations": round(annotations_done - reviews_done, 1),
        "seconds_counts": round(finished - annotations_done, 1),
    }


def rebuild_counts(conn: psycopg.Connection[Any]) -> None:
    """Recompute the rollups from the tables: `conversation_counts` (migration 0010) and,
    once migration 0013 is there, the /stats rollups, folded (writer 0, daily tables)."""
    exists = conn.execute("SELECT to_regclass('conversation_counts') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return  # a checkout before migration 0010
    with conn.transaction():
        conn.execute("TRUNCATE conversation_counts")
        conn.execute(COUNTS_SQL)
    conn.execute("ANALYZE conversation_counts")
    stats = conn.execute("SELECT to_regclass('conversation_stats') IS NOT NULL").fetchone()
    if not stats or not stats[0]:
        return  # a checkout before migration 0013
    with conn.transaction():
        conn.execute("SELECT rebuild_conversation_stats(), rebuild_review_counts()")
    conn.execute(
        "ANALYZE conversation_stats, conversation_stats_daily, review_counts, review_counts_daily"
    )
