"""Assessment ids. What the assessment and run stores do (idempotent writes, a latest view that only moves
forward, run totals) is tested on every backend by tests/test_store_contracts.py."""

from __future__ import annotations

import itertools

from shared.assessments import Assessment, assessment_id

T1 = "2026-01-01T02:00:00.000Z"


def test_assessment_id_is_deterministic_and_distinct_per_run_student_and_skill() -> None:
    keys = list(itertools.product(["r1", "r2", "r1 s"], ["s1", "s2", "s 1"], ["communication", "leadership"]))
    ids = [assessment_id(*key) for key in keys]

    assert ids == [assessment_id(*key) for key in keys]
    assert len(set(ids)) == len(keys)
    assert all(len(i) == 40 and int(i, 16) >= 0 for i in ids)
    # The parts are separated, so shifting text from one part to the next gives another id.
    assert assessment_id("r1", "s1x", "y") != assessment_id("r1s", "1x", "y")
    stored = Assessment(
        run_id="r1", student_id="s1", skill="communication", score=0.5, confidence=0.0, model_version="1.0.0",
        features_hash="h-s1", assessed_at=T1,
    )
    assert stored.id == assessment_id("r1", "s1", "communication")
