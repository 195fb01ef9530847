"""benchmarks/seed_conversations.py: the seeded history looks like production for issue
15's figures, and the load rebuilds every index of the live schema (later migrations'
included), each with its exact definition."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from seed_conversations import DiskGuard, mark_delivery_cuts, seed

# Each index with its definition and the statistics targets of its columns (the search
# expression index's, migration 0015: a definition does not carry them).
INDEXES = """
    SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid),
           (SELECT array_agg(a.attstattarget ORDER BY a.attnum) FROM pg_attribute a
            WHERE a.attrelid = i.indexrelid)::text
    FROM pg_index i WHERE i.indrelid = ANY('{conversations,deliveries}'::regclass[])
"""


def test_the_seed_rebuilds_every_index_of_the_live_schema(own_database: str) -> None:
    with psycopg.connect(own_database, autocommit=True) as conn:
        # As a later migration would add them (0013-0015 do).
        conn.execute("CREATE INDEX later_conversations_idx ON conversations (model, status)")
        conn.execute(
            "CREATE INDEX later_deliveries_idx ON deliveries (ended) WHERE ended IS NOT NULL"
        )
        conn.execute("CREATE INDEX later_expression_idx ON conversations (lower(model))")
        conn.execute("ALTER INDEX later_expression_idx ALTER COLUMN 1 SET STATISTICS 500")
        before = set(conn.execute(INDEXES).fetchall())
    seeded = seed(own_database, 2_000, jobs=2, guard=DiskGuard(None, 0))
    with psycopg.connect(own_database, autocommit=True) as conn:
        after = set(conn.execute(INDEXES).fetchall())
    assert after == before
    assert {"later_conversations_idx", "later_deliveries_idx"} <= set(seeded["indexes_rebuilt"])
    assert seeded["rows_seeded"] == 2_000


@pytest.mark.slow
def test_the_seeded_history_has_production_s_mix(own_database: str) -> None:
    count = 20_000
    seed(own_database, count, jobs=2, guard=DiskGuard(None, 0))
    with psycopg.connect(own_database, autocommit=True) as conn:

        def share(condition: str) -> float:
            row = conn.execute(f"SELECT avg(({condition})::int) FROM conversations").fetchone()
            assert row is not None
            return float(row[0])

        assert 0.89 < share("status = 'completed'") < 0.93
        codes = dict(conn.execute("SELECT error_code, count(*) FROM conversations"
                                  " WHERE status = 'failed' GROUP BY 1").fetchall())  # fmt: skip
        assert set(codes) == {"upstream_timeout", "upstream_error", "storage_unavailable"}
        assert share("status = 'cancelled' AND error_code = 'cancelled'") > 0.015
        assert share("status = 'interrupted' AND error_code = 'interrupted'") > 0.008
        ttfc = conn.execute(
            "SELECT min(ms), percentile_disc(0.5) WITHIN GROUP (ORDER BY ms), max(ms) FROM ("
            " SELECT extract(epoch FROM first_chunk_at - created_at) * 1000 AS ms"
            " FROM conversations WHERE first_chunk_at IS NOT NULL) AS t"
        ).fetchone()
        assert ttfc is not None
        assert ttfc[0] > 149 and 350 < ttfc[1] < 550 and 2000 < ttfc[2] <= 3001
        assert share("completed_at > coalesce(first_chunk_at, created_at)") == 1
        assert share("first_chunk_at IS NULL") > 0.003  # timeouts before any chunk
        assert 0.08 < share("tokens_estimated") < 0.14
        assert share("completion_tokens >= chunk_count AND prompt_tokens > 0") == 1
        providers = conn.execute("SELECT count(DISTINCT provider) FROM conversations").fetchone()
        assert providers == (2,)
        # Every conversation has its first connection; ~3% were never sent the final event.
        assert (
            share("EXISTS (SELECT FROM deliveries d WHERE d.conversation_id = conversations.id)")
            == 1
        )
        incomplete = share(
            "NOT EXISTS (SELECT FROM deliveries d WHERE d.conversation_id = conversations.id"
            " AND d.ended IN ('done', 'error'))"
        )
        assert 0.015 < incomplete < 0.06
        left = conn.execute(
            "SELECT count(*) FILTER (WHERE last_seq >= c.chunk_count) FROM deliveries d"
            " JOIN conversations c ON c.id = d.conversation_id"
            " WHERE d.ended = 'client_left' AND d.via <> 'attach'"
        ).fetchone()
        assert left == (0,), "a client that left was sent fewer chunks than the answer has"
        # On disk in created_at order, as the service appends: a walk of the newest rows
        # reads neighbouring pages. Two connections interleave their pages, so: rows of
        # consecutive times a page or two apart, nearly always (4% are farther; 76% were
        # when the joins with the texts set the order).
        blocks = [
            row[0]
            for row in conn.execute(
                "SELECT (ctid::text::point)[0] FROM conversations ORDER BY created_at, id"
            ).fetchall()
        ]
    far = sum(abs(b - a) > 2 for a, b in itertools.pairwise(blocks))
    assert far < count / 10, f"{far} of {count} seeded rows far on disk from the one before"


@pytest.mark.slow
def test_delivery_cuts_are_marked_from_the_deliveries(own_database: str) -> None:
    # The flag of migration 0014, as it adds it (a no-op once 0014 is merged).
    with psycopg.connect(own_database, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE conversations"
            " ADD COLUMN IF NOT EXISTS delivery_cut boolean NOT NULL DEFAULT false"
        )
    seed(own_database, 5_000, jobs=1, guard=DiskGuard(None, 0))
    marked = mark_delivery_cuts(own_database)
    with psycopg.connect(own_database, autocommit=True) as conn:
        cut = conn.execute(
            "SELECT count(*) FROM conversations c WHERE NOT EXISTS (SELECT FROM deliveries d"
            " WHERE d.conversation_id = c.id AND d.ended IN ('done', 'error'))"
        ).fetchone()
        flagged = conn.execute("SELECT count(*) FROM conversations WHERE delivery_cut").fetchone()
    assert cut is not None and 50 < cut[0] < 300  # ~3% of 5,000
    assert flagged == cut and marked == cut[0]
    assert mark_delivery_cuts(own_database) == 0  # only once
