"""Reference profiles: what a model version's features looked like when it was fine.

A profile holds, per feature, what the drift statistics compare live traffic with, computed
once: the reference's bin edges and bin counts (PSI, JS, Hellinger), a sorted sample (KS,
Wasserstein), or its categories and their counts (chi-squared, JS, L-infinity), plus one
threshold per statistic.

Features are named after the tensors they come from: an input tensor ``x`` of shape
``[rows, k]`` gives ``x[0]`` ... ``x[k-1]`` (just ``x`` when k == 1; trailing dimensions
are flattened), an output ``y`` gives ``output:y[j]``. A feature is *categorical* when its
values are bool, bytes/strings, or integers with at most ``categorical_max`` (20) distinct
values in the reference; every other feature is numerical.

Thresholds come from the reference itself, as NannyML does: chunks of rows / ``chunks``
(10) rows are drawn at random from the reference (50 draws, seeded), each chunk's statistic
against the rest of the reference is computed, and the threshold is mean + 3 standard
deviations over the draws. Leaving the chunk out of what it is compared with matters: a
chunk compared with a reference containing it looks closer than live traffic ever does.
A statistic's spread shrinks with the sample size, so these thresholds fit windows holding
at least rows / chunks sampled rows; smaller windows drift more by chance (override the
thresholds per feature in the settings, or make windows longer).

On disk: ``<profiles_dir>/<model>/<version>/profile.json`` (names, kinds, categories,
thresholds) and ``arrays.npz`` (edges, counts, sorted samples).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from monitor import stats
from monitor.stats import ReferenceBins, SortedSample
from turnout_contract.names import check_model_name, contained

__all__ = [
    "FeatureProfile",
    "Profile",
    "build_profile",
    "load_data",
    "load_profile",
    "profile_dir",
    "save_profile",
    "tensor_features",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Largest sorted reference sample kept for KS and Wasserstein (a seeded subsample beyond).
MAX_SORTED_SAMPLE = 100_000
#: Random reference chunks a threshold is estimated from.
THRESHOLD_DRAWS = 50

NUMERICAL_STATISTICS = ("psi", "js", "hellinger", "ks", "wasserstein")
CATEGORICAL_STATISTICS = ("psi", "js", "chi2_cramers_v", "linf")


def tensor_features(name: str, array: npt.ArrayLike) -> list[tuple[str, npt.NDArray[Any]]]:
    """Split a ``[rows, ...]`` tensor into named 1-D feature columns."""
    values = np.asarray(array)
    if values.ndim == 0:
        values = values.reshape(1, 1)
    elif values.ndim == 1:
        values = values.reshape(-1, 1)
    values = values.reshape(values.shape[0], -1)
    if values.shape[1] == 1:
        return [(name, values[:, 0])]
    return [(f"{name}[{j}]", values[:, j]) for j in range(values.shape[1])]


def features_of(
    inputs: Mapping[str, npt.ArrayLike], outputs: Mapping[str, npt.ArrayLike]
) -> dict[str, npt.NDArray[Any]]:
    """All feature columns of one batch's sampled inputs and outputs."""
    columns: dict[str, npt.NDArray[Any]] = {}
    for name, array in inputs.items():
        columns.update(tensor_features(name, array))
    for name, array in outputs.items():
        columns.update(tensor_features(f"output:{name}", array))
    return columns


def _is_textual(values: npt.NDArray[Any]) -> bool:
    return values.dtype.kind in "OSU"


def _as_text(values: npt.NDArray[Any]) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


@dataclass(eq=False)
class FeatureProfile:
    """One feature's reference, reduced to what the statistics need."""

    name: str
    kind: Literal["numerical", "categorical"]
    ref_counts: IntArray
    """Numerical: ``bins.counts(reference)``; categorical: counts per category + other."""
    thresholds: dict[str, float]
    bins: ReferenceBins | None = None
    sample: SortedSample | None = None
    categories: list[float] | list[str] = field(default_factory=list)
    """Categorical only: the reference's distinct values (numbers, or text)."""

    def count(self, values: npt.NDArray[Any], out: IntArray) -> int:
        """Add live ``values`` into ``out`` (shaped like ``ref_counts``); returns how many
        values were counted."""
        if self.kind == "numerical":
            assert self.bins is not None
            numbers = _numbers(values)
            self.bins.add(numbers, out)
            return int(np.count_nonzero(~np.isnan(numbers)))
        out += stats.category_counts(self.codes(values), len(self.categories))
        return int(values.size)

    def codes(self, values: npt.NDArray[Any]) -> IntArray:
        """Category codes of ``values``; values the reference never saw get ``len(categories)``."""
        n = len(self.categories)
        if self.categories and isinstance(self.categories[0], str):
            index = {c: i for i, c in enumerate(self.categories)}
            return np.array([index.get(v, n) for v in _as_text(values)], dtype=np.int64)
        known = np.asarray(self.categories, dtype=np.float64)
        numbers = _numbers(values)
        position = np.searchsorted(known, numbers)
        clipped = np.minimum(position, n - 1)
        return np.where(known[clipped] == numbers, clipped, n).astype(np.int64)

    def statistics(self, counts: IntArray) -> dict[str, float]:
        """The binned statistics of live ``counts`` against the reference."""
        if counts.sum() == 0:
            return {}
        if self.kind == "numerical":
            return {
                "psi": stats.psi(self.ref_counts, counts),
                "js": stats.js_distance(self.ref_counts, counts),
                "hellinger": stats.hellinger(self.ref_counts, counts),
            }
        return {
            "psi": stats.psi(self.ref_counts, counts),
            "js": stats.categorical_js(self.ref_counts, counts),
            "chi2_cramers_v": stats.chi2_cramers_v(self.ref_counts, counts).cramers_v,
            "linf": stats.l_infinity(self.ref_counts, counts),
        }

    def slow_statistics(self, values: FloatArray) -> dict[str, float]:
        """KS and normed Wasserstein of live ``values`` against the sorted reference."""
        finite = values[np.isfinite(values)]
        if self.kind != "numerical" or self.sample is None or finite.size == 0:
            return {}
        live = SortedSample.of(finite)
        return {
            "ks": stats.ks_statistic(self.sample, live),
            "wasserstein": stats.wasserstein_normed(self.sample, live),
        }


def _numbers(values: npt.NDArray[Any]) -> FloatArray:
    if _is_textual(values):
        return np.full(values.size, np.nan)
    return np.asarray(values, dtype=np.float64).ravel()


@dataclass(eq=False)
class Profile:
    model: str
    version: int
    rows: int
    features: dict[str, FeatureProfile]
    created: float = field(default_factory=time.time)
    source: str = ""


def _feature(
    name: str, values: npt.NDArray[Any], *, n_bins: int, categorical_max: int, chunks: int
) -> FeatureProfile | None:
    values = np.asarray(values).ravel()
    kind: Literal["numerical", "categorical"]
    categories: list[float] | list[str] = []
    if _is_textual(values):
        kind = "categorical"
        categories = sorted(set(_as_text(values)))
    elif values.dtype == np.bool_ or (
        values.dtype.kind in "iu" and np.unique(values).size <= categorical_max
    ):
        kind = "categorical"
        categories = [float(v) for v in np.unique(values.astype(np.float64))]
    else:
        kind = "numerical"
        numbers = _numbers(values)
        numbers = numbers[np.isfinite(numbers)]
        if numbers.size == 0:
            return None
    profile = FeatureProfile(name, kind, np.zeros(0, np.int64), {}, categories=categories)
    if kind == "numerical":
        profile.bins = ReferenceBins.fit(numbers, n_bins)
        profile.ref_counts = profile.bins.counts(numbers)
        sample = numbers
        if sample.size > MAX_SORTED_SAMPLE:
            sample = np.random.default_rng(0).choice(sample, MAX_SORTED_SAMPLE, replace=False)
        profile.sample = SortedSample.of(sample)
    else:
        profile.ref_counts = np.zeros(len(categories) + 1, np.int64)
        profile.count(values, profile.ref_counts)
    profile.thresholds = _reference_thresholds(profile, values, chunks)
    return profile


def _reference_thresholds(
    profile: FeatureProfile, values: npt.NDArray[Any], chunks: int
) -> dict[str, float]:
    """mean + 3 sigma of each statistic over random reference chunks of rows / chunks rows,
    each compared with the rest of the reference (leaving the chunk out, so the chunk is
    as independent of what it is compared with as live traffic is)."""
    size = values.size // chunks
    if size < 2 or values.size - size < 2:
        return {}
    rng = np.random.default_rng(0)
    per_statistic: dict[str, list[float]] = {}
    for _ in range(THRESHOLD_DRAWS):
        chosen = np.zeros(values.size, dtype=bool)
        chosen[rng.choice(values.size, size, replace=False)] = True
        chunk, rest = values[chosen], values[~chosen]
        counts = np.zeros_like(profile.ref_counts)
        profile.count(chunk, counts)
        rest_profile = FeatureProfile(
            profile.name, profile.kind, profile.ref_counts - counts, {}, profile.bins,
            categories=profile.categories,
        )  # fmt: skip
        found = rest_profile.statistics(counts) if rest_profile.ref_counts.sum() else {}
        if profile.kind == "numerical":
            rest_numbers = _numbers(rest)
            rest_numbers = rest_numbers[np.isfinite(rest_numbers)]
            if rest_numbers.size > MAX_SORTED_SAMPLE:
                rest_numbers = rng.choice(rest_numbers, MAX_SORTED_SAMPLE, replace=False)
            if rest_numbers.size:
                rest_profile.sample = SortedSample.of(rest_numbers)
                found.update(rest_profile.slow_statistics(_numbers(chunk)))
        for statistic, value in found.items():
            per_statistic.setdefault(statistic, []).append(value)
    return {
        statistic: float(np.mean(found) + 3 * np.std(found))
        for statistic, found in per_statistic.items()
    }


def build_profile(
    model: str,
    version: int,
    columns: Mapping[str, npt.ArrayLike],
    *,
    n_bins: int = 10,
    categorical_max: int = 20,
    chunks: int = 10,
    source: str = "",
) -> Profile:
    """A profile of named 1-D feature columns (all of one length)."""
    arrays = {name: np.asarray(values).ravel() for name, values in columns.items()}
    lengths = {a.size for a in arrays.values()}
    if not arrays or len(lengths) != 1:
        raise ValueError("need at least one feature column, all of the same length")
    rows = lengths.pop()
    if rows < 2:
        raise ValueError(f"a reference needs at least 2 rows, got {rows}")
    features: dict[str, FeatureProfile] = {}
    for name, values in arrays.items():
        feature = _feature(
            name, values, n_bins=n_bins, categorical_max=categorical_max, chunks=chunks
        )
        if feature is not None:
            features[name] = feature
    return Profile(model, version, rows, features, source=source)


def load_data(path: Path, input_name: str | None = None) -> dict[str, npt.NDArray[Any]]:
    """Feature columns of a reference file: ``.npy`` (a tensor named ``input_name``,
    default ``input``), ``.csv`` or ``.parquet`` (columns named as features, e.g. ``x[0]``,
    ``output:y``; or, with ``input_name``, all columns as that tensor's positions)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return dict(tensor_features(input_name or "input", np.load(path, allow_pickle=False)))
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"{path}: unsupported data file (use .csv, .parquet or .npy)")
    pd: Any = importlib.import_module("pandas")  # only for CSV and Parquet
    frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    if input_name:
        return dict(tensor_features(input_name, frame.to_numpy()))
    return {str(column): frame[column].to_numpy() for column in frame.columns}


def profile_dir(root: Path, model: str, version: int) -> Path:
    """``root/model/version``: a valid model name, resolved inside ``root``."""
    return contained(root, check_model_name(model), str(version))


def save_profile(profile: Profile, root: Path) -> Path:
    """Write the profile under ``root/<model>/<version>/`` (atomically per file)."""
    folder = profile_dir(root, profile.model, profile.version)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {}
    described: list[dict[str, Any]] = []
    for i, feature in enumerate(profile.features.values()):
        arrays[f"{i}_counts"] = feature.ref_counts
        if feature.bins is not None:
            arrays[f"{i}_edges"] = np.asarray(feature.bins.edges)
        if feature.sample is not None:
            arrays[f"{i}_sample"] = np.asarray(feature.sample.values)
        described.append(
            {
                "name": feature.name,
                "kind": feature.kind,
                "thresholds": feature.thresholds,
                "categories": list(feature.categories),
            }
        )
    meta = {
        "model": profile.model,
        "version": profile.version,
        "rows": profile.rows,
        "created": profile.created,
        "source": profile.source,
        "features": described,
    }
    with open(folder / "arrays.npz.tmp", "wb") as handle:
        np.savez(handle, **arrays)
    (folder / "arrays.npz.tmp").replace(folder / "arrays.npz")
    (folder / "profile.json.tmp").write_text(json.dumps(meta, indent=2))
    (folder / "profile.json.tmp").replace(folder / "profile.json")
    return folder


def load_profile(root: Path, model: str, version: int) -> Profile | None:
    """The stored profile, or None when there is none."""
    folder = profile_dir(root, model, version)
    if not (folder / "profile.json").exists():
        return None
    meta = json.loads((folder / "profile.json").read_text())
    features: dict[str, FeatureProfile] = {}
    with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
        for i, described in enumerate(meta["features"]):
            feature = FeatureProfile(
                name=described["name"],
                kind=described["kind"],
                ref_counts=arrays[f"{i}_counts"].astype(np.int64),
                thresholds={k: float(v) for k, v in described["thresholds"].items()},
                categories=described["categories"],
            )
            if f"{i}_edges" in arrays:
                feature.bins = ReferenceBins.from_edges(arrays[f"{i}_edges"])
            if f"{i}_sample" in arrays:
                feature.sample = SortedSample.of(arrays[f"{i}_sample"])
            features[feature.name] = feature
    return Profile(
        model=meta["model"],
        version=int(meta["version"]),
        rows=int(meta["rows"]),
        features=features,
        created=float(meta["created"]),
        source=meta.get("source", ""),
    )


def stored_versions(root: Path) -> Iterable[tuple[str, int]]:
    for path in sorted(root.glob("*/*/profile.json")):
        if path.parent.name.isdigit():
            yield path.parent.parent.name, int(path.parent.name)
