"""Row ids (ids.py): version 7 UUIDs that grow with time, unique, carrying their time."""

from __future__ import annotations

import time
import uuid

from sse_llm.ids import new_id


def test_an_id_is_a_version_7_rfc_uuid() -> None:
    made = new_id()
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert uuid.UUID(str(made)) == made


def test_ids_grow_with_time_and_carry_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_id()
    time.sleep(0.002)
    second = new_id()
    after = time.time_ns() // 1_000_000
    assert first < second
    assert before <= first.int >> 80 <= second.int >> 80 <= after


def test_ids_made_in_the_same_millisecond_differ() -> None:
    assert len({new_id() for _ in range(10_000)}) == 10_000
