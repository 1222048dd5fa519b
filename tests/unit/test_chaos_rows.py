"""bench/chaos.py's rows from its rounds: counts summed, ratios the rounds' median, and a
probe's p99 over every round's samples pooled rather than a median of the rounds' p99s."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench import chaos


def probe_document(refusals: list[float], served: list[float]) -> dict[str, Any]:
    """Samples sent 10 ms apart from t = 100 s, the refusals first."""
    return {
        "statuses": {"429": len(refusals), "200": len(served)},
        "latency": {},
        "samples_ms": {"429": refusals, "200": served},
        "sent_at": {
            "429": [100 + 0.01 * i for i in range(len(refusals))],
            "200": [100 + 0.01 * (len(refusals) + i) for i in range(len(served))],
        },
    }


def round_row(ratio: float, refusals: list[float]) -> dict[str, Any]:
    probes = {kind: probe_document(refusals, [1.0, 2.0]) for kind in ("new", "kept", "control")}
    return chaos.row(
        "overload-closed-http", sent=100, ok=80, failed=20, unexpected=0, timeouts=0,
        goodput_rps=ratio * 1000, capacity_rps=1000.0, goodput_ratio=ratio, probes=probes,
        crowd_at=100.0,
    )  # fmt: skip


def test_rounds_merge_into_summed_counts_median_ratios_and_pooled_tails() -> None:
    rng = np.random.default_rng(7)
    quick = [list(rng.uniform(0.5, 2.0, 99)) for _ in range(2)]
    # One round has a slow tail: its samples count in the pooled p99, not only as a round.
    # It comes at the crowd's onset (the first 9 samples, sent in its first 0.09 s).
    slow = [50.0] * 9 + list(rng.uniform(0.5, 2.0, 90))
    rounds = [round_row(0.7, quick[0]), round_row(0.9, slow), round_row(0.8, quick[1])]
    merged = chaos.merged_rounds(rounds)
    assert (merged["sent"], merged["ok"], merged["failed"]) == (300, 240, 60)
    assert merged["goodput_ratio"] == 0.8
    assert merged["goodput_ratios"] == [0.7, 0.9, 0.8]
    pooled = quick[0] + slow + quick[1]
    assert merged["refusal_p99_ms_new"] == float(np.percentile(pooled, 99))
    assert merged["refusal_p99_ms_new"] == 50.0  # 9 of 297 samples: past the 99th percentile
    assert merged["refusals_timed_kept"] == 297
    # Past the onset (0.5 s: the first 50 samples of each round), the tail is gone.
    steady = quick[0][50:] + slow[50:] + quick[1][50:]
    assert merged["refusal_p99_ms_new_steady"] == float(np.percentile(steady, 99))
    assert merged["refusal_p99_ms_new_steady"] < 2.0
    everything = pooled + [1.0, 2.0] * 3
    assert merged["probe_p99_ms_kept"] == float(np.percentile(everything, 99))
    assert merged["control_p99_ms_new"] == float(np.percentile(everything, 99))


def test_no_samples_no_p99() -> None:
    assert chaos.pooled_p99([probe_document([], [1.0])], "429") is None
