"""Shadow comparison: exact matches, numeric differences, shape and name mismatches, and a
mirror whose shadow version is missing or fails."""

from __future__ import annotations

import asyncio

import numpy as np

from gateway.routing.shadow import ShadowMirror, ShadowStats, compare_answers
from turnout_contract.records import SHADOW, RequestRecord
from turnout_contract.trace import TraceContext


def test_identical_answers_are_an_exact_match_with_zero_difference() -> None:
    stats = ShadowStats(requests=1)
    y = np.array([[1.0, 2.0]], np.float32)
    compare_answers({"y": y}, {"y": y.copy()}, stats)
    assert (stats.exact_matches, stats.abs_diff_sum, stats.compared_values) == (1, 0.0, 2)
    assert stats.public() == {
        "requests": 1,
        "errors": 0,
        "shed": 0,
        "exact_match_rate": 1.0,
        "mean_abs_diff": 0.0,
    }


def test_numeric_differences_are_summed_per_value() -> None:
    stats = ShadowStats(requests=2)
    compare_answers({"y": np.array([1, 2, 3])}, {"y": np.array([1, 4, 0])}, stats)
    compare_answers({"y": np.array([1.5])}, {"y": np.array([1.0])}, stats)
    assert stats.exact_matches == 0
    assert stats.abs_diff_sum == 5.5 and stats.compared_values == 4
    assert stats.public()["mean_abs_diff"] == 5.5 / 4


def test_a_missing_output_or_another_shape_is_a_mismatch_without_a_difference() -> None:
    stats = ShadowStats(requests=2)
    compare_answers({"y": np.zeros(2)}, {"z": np.zeros(2)}, stats)
    compare_answers({"y": np.zeros(2)}, {"y": np.zeros(3)}, stats)
    assert (stats.exact_matches, stats.compared_values) == (0, 0)
    assert stats.public()["exact_match_rate"] == 0.0


def test_strings_compare_exactly_and_add_no_difference() -> None:
    stats = ShadowStats(requests=1)
    words = np.array([b"a", b"b"], dtype=np.object_)
    compare_answers({"w": words}, {"w": words.copy()}, stats)
    assert (stats.exact_matches, stats.compared_values) == (1, 0)


class FailingBatcher:
    async def submit(self, *args: object) -> object:
        raise RuntimeError("replica gone")


async def test_a_missing_or_failing_shadow_counts_an_error_and_never_touches_the_primary() -> None:
    seen: list[RequestRecord] = []
    mirror = ShadowMirror([seen.append])
    primary: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
    trace = TraceContext.start()
    tensors = {"x": np.zeros((1, 2), np.float32)}
    mirror.mirror("m", 3, None, tensors, 1, primary, trace)
    mirror.mirror("m", 3, FailingBatcher(), tensors, 1, primary, trace)  # type: ignore[arg-type]
    while mirror._background:
        await asyncio.sleep(0)
    assert mirror.stats[("m", 3)].public()["errors"] == 2
    assert not primary.done()
    (record,) = seen
    assert (record.model, record.version, record.kind, record.arm, record.status) == (
        "m", 3, SHADOW, SHADOW, 500,
    )  # fmt: skip
    assert record.trace.parent_span_id == trace.span_id and record.trace.trace_id == trace.trace_id
    assert "replica gone" in record.error
