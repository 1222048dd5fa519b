"""monitor.profiles: feature naming, kinds, reference thresholds, storage and data files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monitor.profiles import (
    build_profile,
    features_of,
    load_data,
    load_profile,
    save_profile,
    tensor_features,
)


def test_tensor_features_are_named_by_tensor_and_position() -> None:
    assert [n for n, _ in tensor_features("x", np.zeros((4, 3)))] == ["x[0]", "x[1]", "x[2]"]
    assert [n for n, _ in tensor_features("x", np.zeros((4, 1)))] == ["x"]
    assert [n for n, _ in tensor_features("x", np.zeros(4))] == ["x"]
    assert len(tensor_features("img", np.zeros((4, 2, 3)))) == 6  # trailing dims flattened
    names = features_of({"x": np.zeros((2, 2))}, {"y": np.zeros((2, 1))})
    assert list(names) == ["x[0]", "x[1]", "output:y"]


def test_kinds_follow_the_documented_rule() -> None:
    rng = np.random.default_rng(1)
    profile = build_profile(
        "m",
        1,
        {
            "f": rng.normal(size=1000),
            "few_ints": rng.integers(0, 3, 1000),
            "many_ints": rng.integers(0, 1000, 1000),
            "flag": rng.integers(0, 2, 1000).astype(bool),
            "text": np.array([b"a", b"b"] * 500, dtype=object),
        },
    )
    kinds = {name: f.kind for name, f in profile.features.items()}
    assert kinds == {
        "f": "numerical",
        "few_ints": "categorical",
        "many_ints": "numerical",
        "flag": "categorical",
        "text": "categorical",
    }
    assert profile.features["text"].categories == ["a", "b"]
    assert set(profile.features["f"].thresholds) == {"psi", "js", "hellinger", "ks", "wasserstein"}
    assert set(profile.features["text"].thresholds) == {"psi", "js", "chi2_cramers_v", "linf"}


def test_reference_thresholds_separate_shifted_from_unshifted_chunks() -> None:
    rng = np.random.default_rng(2)
    profile = build_profile("m", 1, {"f": rng.normal(size=10_000)}, chunks=10)
    feature = profile.features["f"]
    same = rng.normal(size=1000)
    shifted = rng.normal(size=1000) + 0.5
    for statistic in ("psi", "js", "hellinger"):
        threshold = feature.thresholds[statistic]
        assert feature.statistics(feature.bins.counts(same))[statistic] < threshold  # type: ignore[union-attr]
        assert feature.statistics(feature.bins.counts(shifted))[statistic] > threshold  # type: ignore[union-attr]
    assert feature.slow_statistics(shifted)["ks"] > feature.thresholds["ks"]


def test_unseen_categories_count_in_the_last_slot() -> None:
    profile = build_profile("m", 1, {"c": np.array([1, 2, 3] * 10)})
    feature = profile.features["c"]
    assert feature.codes(np.array([3, 1, 7])).tolist() == [2, 0, 3]
    counts = np.zeros_like(feature.ref_counts)
    feature.count(np.array([1, 9, 9]), counts)
    assert counts.tolist() == [1, 0, 0, 2]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    columns = {
        "x[0]": rng.normal(size=500),
        "c": rng.integers(0, 4, 500),
        "output:label": np.array(["cat", "dog"] * 250, dtype=object),
    }
    profile = build_profile("iris", 2, columns, source="test")
    save_profile(profile, tmp_path)
    assert (tmp_path / "iris" / "2" / "profile.json").exists()
    loaded = load_profile(tmp_path, "iris", 2)
    assert loaded is not None and loaded.rows == 500 and loaded.source == "test"
    assert load_profile(tmp_path, "iris", 3) is None
    live = {"x[0]": rng.normal(size=200) + 0.3, "c": rng.integers(0, 5, 200)}
    live["output:label"] = np.array(["cat", "dog", "eel", "dog"] * 50, dtype=object)
    for name, values in live.items():
        before, after = profile.features[name], loaded.features[name]
        assert after.kind == before.kind
        assert after.thresholds == pytest.approx(before.thresholds)
        counts_before = np.zeros_like(before.ref_counts)
        counts_after = np.zeros_like(after.ref_counts)
        before.count(values, counts_before)
        after.count(values, counts_after)
        assert counts_after.tolist() == counts_before.tolist()
        assert after.statistics(counts_after) == pytest.approx(before.statistics(counts_before))
        values_f = np.asarray(values, dtype=np.float64) if before.kind == "numerical" else None
        if values_f is not None:
            assert after.slow_statistics(values_f) == pytest.approx(
                before.slow_statistics(values_f)
            )


def test_load_data_reads_csv_parquet_and_npy(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "ref.npy", array)
    from_npy = load_data(tmp_path / "ref.npy", "x")
    assert list(from_npy) == ["x[0]", "x[1]", "x[2]"]
    assert from_npy["x[1]"].tolist() == [1.0, 4.0, 7.0, 10.0]
    frame = pd.DataFrame({"x[0]": array[:, 0], "output:y": [0, 1, 0, 1]})
    frame.to_csv(tmp_path / "ref.csv", index=False)
    frame.to_parquet(tmp_path / "ref.parquet")
    for name in ("ref.csv", "ref.parquet"):
        columns = load_data(tmp_path / name)
        assert list(columns) == ["x[0]", "output:y"]
        assert columns["output:y"].tolist() == [0, 1, 0, 1]
    positional = load_data(tmp_path / "ref.csv", "x")
    assert list(positional) == ["x[0]", "x[1]"]
    with pytest.raises(ValueError, match="unsupported"):
        load_data(tmp_path / "ref.json")
