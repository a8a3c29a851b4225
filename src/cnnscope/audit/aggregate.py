"""Per-class figures, SpRAy clusters, flags and galleries, from the store alone (the images are not read again:
the galleries use the thumbnails kept in the shards).

Memory: the scalar columns of every image (a few dozen bytes each) and, per class, the running sum and sum
of squares of its maps plus at most ``MAX_CLUSTERED`` maps for SpRAy (a fixed-seed reservoir sample when a
class has more), so the aggregation stays small however large the dataset.

The flags, each with its reason (one sentence) and its evidence (the numbers), and the thresholds in
:class:`Thresholds` (measured on the demo data; see its docstring):

- ``fixed-place``: the class's maps peak in one sixteenth of the image (a 4 x 4 grid) far more often than the
  other classes' maps do there: the attention sits at a fixed place whatever the image shows ("the bear
  model that always looks at the lower-left corner"); the evidence adds the mean map's concentration (share
  of its mass in its strongest tenth) and its spread (relative standard deviation of the maps around it);
- ``off-object`` (only with masks or boxes): the share of the class's evidence that lies on the object is
  low for the object's size, and well below the other classes': the model looks at the context ("the tank
  detector that learned the weather", "Krusty recognised by the red TV background");
- ``clever-hans`` (only with masks or boxes): SpRAy splits the class's maps into clusters and a minority
  cluster follows a different strategy from the main one (its mean map far from the main cluster's, and its
  evidence off the object): the Clever Hans signature of Lapuschkin et al. The clusters are computed and
  shown for every class, masks or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..models.labels import short_name
from .spray import Spray, spray
from .stats import REGION_NAMES_4, normalized, peak_region, region_masks, top_share

#: At most this many maps of one class go into SpRAy (a reservoir sample of the rest).
MAX_CLUSTERED = 400
#: Images per gallery.
GALLERY = 6
#: Cluster examples kept per cluster.
CLUSTER_EXAMPLES = 6

SCALARS = (
    "position",
    "label",
    "predicted",
    "correct",
    "probability",
    "label_probability",
    "has_mask",
    "mask_area",
    "true_inside",
    "true_on_object",
    "true_peak_x",
    "true_peak_y",
    "pred_inside",
)


@dataclass(frozen=True)
class Thresholds:
    """When a class is flagged; the defaults, and what they were measured on.

    fixed-place: at least ``fixed_peak_share`` of the class's maps peak in one sixteenth of the image (a 4 x 4
    grid), and that is ``fixed_peak_excess`` more than the share of the other classes' maps peaking there (so
    a dataset whose objects all sit in the centre does not flag every class).
    off-object (masks or boxes): the class's *lift*, the share of its evidence on the object divided by the
    share of the image the object covers (1: no better than a uniform map), is below ``off_object_lift`` and
    below ``off_object_relative`` times the median lift of the other classes. Classes whose objects cover
    more than ``off_object_max_area`` of the image on average are not judged (there even a perfect map has
    a lift below 1 / area).
    clever-hans (masks or boxes): a SpRAy cluster holding ``cluster_min_share`` to ``cluster_max_share`` of
    the class (at least ``cluster_min_images`` images) whose mean map is at least ``cluster_distance`` away
    (total variation, 0 to 1) from the main cluster's, and whose evidence on the object is below
    ``cluster_inside_ratio`` times the main cluster's. Without masks no cluster is flagged: on the cue-free
    demo, clusters of objects at different places are as far apart (0.4 to 0.86) as a cue's cluster.

    Measured on ``demo_audit`` (64-pixel shapes, 4 classes, 240 held-out images, cue on 'circle' in 90% of its
    images; seeds 0 and 1), the cued class against every other class of every run, cue-free runs included:

    ========================  =====================  ==============================  =========
    figure                    cued class, 2 seeds    all 22 other classes            threshold
    ========================  =====================  ==============================  =========
    peak share (patch cue)    0.69, 0.82             at most 0.29                    0.5
    peak excess (patch cue)   0.65, 0.82             at most 0.15                    0.3
    lift (tint cue)           2.28, 2.23             at least 3.29                   2.75
    lift / others' (tint)     0.63, 0.61             at least 0.85                   0.75
    lift (patch cue)          2.59, 2.32 (ratio      -                               -
                              0.69, 0.63: flagged
                              off-object too)
    cluster inside ratio      -                      at least 0.87 (clusters far     0.6
                                                     enough and large enough)
    ========================  =====================  ==============================  =========

    "All 22 other classes": the three other classes of the four cued runs and the four classes of the two
    cue-free runs. The clever-hans rule is checked on maps built to have a minority strategy (tests).
    """

    fixed_peak_share: float = 0.5
    fixed_peak_excess: float = 0.3
    off_object_lift: float = 2.75
    off_object_relative: float = 0.75
    off_object_max_area: float = 0.4
    cluster_min_share: float = 0.05
    cluster_max_share: float = 0.5
    cluster_min_images: int = 4
    cluster_distance: float = 0.3
    cluster_inside_ratio: float = 0.6


THRESHOLDS = Thresholds()


@dataclass
class Flag:
    """A finding about a class: ``kind``, one sentence of ``reason`` and the ``evidence`` numbers."""

    kind: str
    reason: str
    evidence: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kind": self.kind, "reason": self.reason, **self.evidence}


@dataclass
class Cluster:
    """One SpRAy cluster of a class: its size, share, mean map, distance to the main cluster and examples."""

    index: int
    size: int
    share: float
    mean_map: np.ndarray
    distance: float
    inside: float | None
    on_object: float | None
    peak_region: str
    peak_share: float
    concentration: float
    spread: float
    border: float
    examples: list[int]

    def to_json(self) -> dict:
        return {
            "cluster": self.index,
            "images": self.size,
            "share": round(self.share, 4),
            "distance_to_main": round(self.distance, 4),
            "inside": _round(self.inside),
            "on_object": _round(self.on_object),
            "peak_region": self.peak_region,
            "peak_share": _round(self.peak_share),
            "concentration": _round(self.concentration),
            "spread": _round(self.spread),
            "border": _round(self.border),
            "examples": self.examples,
        }


@dataclass
class ClassReport:
    """Everything the audit found about one class (by its true label)."""

    index: int
    name: str
    dataset_name: str
    images: int
    correct: int
    confusion: dict[int, int]
    mean_map: np.ndarray
    variance_map: np.ndarray
    concentration: float
    spread: float
    peak_region: str
    peak_share: float
    peak_share_others: float
    inside: float | None
    inside_others: float | None
    on_object: float | None
    on_object_others: float | None
    mask_area: float | None
    lift: float | None
    lift_others: float | None
    displacement: float
    clusters: list[Cluster]
    spray: Spray | None
    flags: list[Flag] = field(default_factory=list)
    galleries: dict[str, list[int]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else float("nan")

    def metrics(self) -> dict:
        return {
            "concentration": _round(self.concentration),
            "spread": _round(self.spread),
            "peak_region": self.peak_region,
            "peak_share": _round(self.peak_share),
            "peak_share_others": _round(self.peak_share_others),
            "inside": _round(self.inside),
            "inside_others": _round(self.inside_others),
            "on_object": _round(self.on_object),
            "on_object_others": _round(self.on_object_others),
            "mask_area": _round(self.mask_area),
            "lift": _round(self.lift),
            "lift_others": _round(self.lift_others),
            "displacement": _round(self.displacement),
        }

    def to_json(self, labels: Sequence[str]) -> dict:
        return {
            "name": self.name,
            "index": self.index,
            "folder": self.dataset_name,
            "images": self.images,
            "accuracy": round(self.accuracy, 4),
            "confusion": {short_name(labels[k]): v for k, v in sorted(self.confusion.items(), key=lambda kv: -kv[1])},
            "flags": [flag.to_json() for flag in self.flags],
            "metrics": self.metrics(),
            "clusters": [cluster.to_json() for cluster in self.clusters],
            "galleries": self.galleries,
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), digits)


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total variation distance of two maps normalized to sum 1: 0 (same) to 1 (disjoint)."""
    return float(0.5 * np.abs(a - b).sum())


class _Reservoir:
    """A fixed-seed reservoir sample of at most ``capacity`` (position, map) pairs."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.seen = capacity, 0
        self.positions: list[int] = []
        self.maps: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def add(self, position: int, heat: np.ndarray) -> None:
        self.seen += 1
        if len(self.maps) < self.capacity:
            self.positions.append(position)
            self.maps.append(heat)
            return
        slot = int(self.rng.integers(self.seen))
        if slot < self.capacity:
            self.positions[slot], self.maps[slot] = position, heat


def pa_float32():
    import pyarrow

    return pyarrow.float32()


def read_scalars(store) -> dict[str, np.ndarray]:
    """The per-image scalar columns of every finished shard, as numpy arrays (NaN for nulls)."""
    parts: dict[str, list] = {name: [] for name in SCALARS}
    for table in store.batches(SCALARS):
        for name in SCALARS:
            column = table.column(name)
            if column.type == pa_float32():
                column = column.fill_null(float("nan"))  # "no mask", "no evidence"
            parts[name].append(column.to_numpy(zero_copy_only=False))
    return {name: (np.concatenate(values) if values else np.zeros(0)) for name, values in parts.items()}


def aggregate(
    store,
    labels: Sequence[str],
    dataset_names: dict[int, str],
    map_size: int,
    *,
    thresholds: Thresholds = THRESHOLDS,
) -> list[ClassReport]:
    """Per-class reports (classes in label order) from the finished shards of ``store``."""
    scalars = read_scalars(store)
    if len(scalars["position"]) == 0:
        return []
    classes = sorted(int(c) for c in np.unique(scalars["label"]))
    sums = {c: np.zeros((map_size, map_size)) for c in classes}
    squares = {c: np.zeros((map_size, map_size)) for c in classes}
    valid = {c: 0 for c in classes}
    reservoirs = {c: _Reservoir(MAX_CLUSTERED, seed=c) for c in classes}
    for table in store.batches(["position", "label", "map_true"]):
        positions = table.column("position").to_numpy()
        owners = table.column("label").to_numpy()
        cells = table.column("map_true").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        maps = cells.reshape(len(positions), map_size, map_size).astype(np.float64)
        import torch

        shares, ok = normalized(torch.from_numpy(maps))
        shares, ok = shares.numpy(), ok.numpy()
        for row in range(len(positions)):
            if not ok[row]:
                continue
            owner = int(owners[row])
            sums[owner] += shares[row]
            squares[owner] += shares[row] ** 2
            valid[owner] += 1
            reservoirs[owner].add(int(positions[row]), shares[row].astype(np.float32))
    total_sum = sum(sums.values())
    total_valid = sum(valid.values())
    regions = peak_region(scalars["true_peak_x"], scalars["true_peak_y"])
    has_peak = np.isfinite(scalars["true_peak_x"])
    inside_by_class: dict[int, tuple] = {}
    for c in classes:
        chosen = (scalars["label"] == c) & scalars["has_mask"].astype(bool) & np.isfinite(scalars["true_inside"])
        inside_by_class[c] = (
            float(np.mean(scalars["true_inside"][chosen])) if chosen.any() else None,
            float(np.mean(scalars["mask_area"][chosen])) if chosen.any() else None,
            float(np.mean(scalars["true_on_object"][chosen])) if chosen.any() else None,
        )
    reports = []
    for c in classes:
        mine = scalars["label"] == c
        count = int(mine.sum())
        correct = int(scalars["correct"][mine].sum())
        confusion = {
            int(k): int(v) for k, v in zip(*np.unique(scalars["predicted"][mine], return_counts=True), strict=True)
        }
        n = max(valid[c], 1)
        mean_map = sums[c] / n
        variance_map = np.maximum(squares[c] / n - mean_map**2, 0.0)
        spread = float(np.sqrt(variance_map.sum()) / max(np.sqrt((mean_map**2).sum()), 1e-12))
        mine_peaks = mine & has_peak
        others_peaks = ~mine & has_peak
        if mine_peaks.any():
            counts = np.bincount(regions[mine_peaks], minlength=16)
            mode = int(np.argmax(counts))
            peak_share = float(counts[mode] / mine_peaks.sum())
            # with no other class to compare, a fixed place cannot be told from where the objects are
            peak_others = float(np.mean(regions[others_peaks] == mode)) if others_peaks.any() else float("nan")
        else:
            mode, peak_share, peak_others = 0, float("nan"), float("nan")
        inside, area, on_object = inside_by_class[c]
        others = [inside_by_class[o] for o in classes if o != c and inside_by_class[o][0] is not None]
        inside_others = float(np.median([o[0] for o in others])) if others else None
        on_object_others = float(np.median([o[2] for o in others])) if others else None
        lift_others = float(np.median([o[0] / o[1] for o in others if o[1]])) if others else None
        lift = inside / area if inside is not None and area else None
        rest_valid = total_valid - valid[c]
        rest_mean = (total_sum - sums[c]) / rest_valid if rest_valid else None
        report = ClassReport(
            index=c,
            name=short_name(labels[c]),
            dataset_name=dataset_names.get(c, short_name(labels[c])),
            images=count,
            correct=correct,
            confusion=confusion,
            mean_map=mean_map.astype(np.float32),
            variance_map=variance_map.astype(np.float32),
            concentration=top_share(mean_map) if valid[c] else float("nan"),
            spread=spread,
            peak_region=REGION_NAMES_4[mode],
            peak_share=peak_share,
            peak_share_others=peak_others,
            inside=inside,
            inside_others=inside_others,
            on_object=on_object,
            on_object_others=on_object_others,
            mask_area=area,
            lift=lift,
            lift_others=lift_others,
            displacement=_tv(mean_map, rest_mean) if rest_mean is not None and valid[c] else float("nan"),
            clusters=[],
            spray=None,
        )
        _cluster(report, reservoirs[c], scalars, map_size)
        report.flags = flags_for(report, thresholds)
        report.galleries = _galleries(report, reservoirs[c], scalars)
        reports.append(report)
    return reports


def _cluster(report: ClassReport, reservoir: _Reservoir, scalars: dict, map_size: int) -> None:
    if not reservoir.maps:
        return
    maps = np.stack(reservoir.maps)
    result = spray(maps)
    report.spray = result
    row_of = {int(p): i for i, p in enumerate(scalars["position"].tolist())}
    positions = np.array(reservoir.positions)
    rows = np.array([row_of[int(p)] for p in positions])
    flat = maps.reshape(len(maps), -1).argmax(axis=1)
    regions = peak_region(((flat % map_size) + 0.5) / map_size, ((flat // map_size) + 0.5) / map_size)
    main_mean = maps[result.labels == 0].mean(axis=0)
    border = region_masks(map_size)["border"].numpy()
    for index in range(result.count):
        members = result.labels == index
        mean_map = maps[members].mean(axis=0)
        distances = 0.5 * np.abs(maps[members] - mean_map).sum(axis=(1, 2))
        examples = [int(p) for p in positions[members][np.argsort(distances)[:CLUSTER_EXAMPLES]]]
        counts = np.bincount(regions[members], minlength=16)
        mode = int(np.argmax(counts))
        report.clusters.append(
            Cluster(
                index=index,
                size=int(members.sum()),
                share=float(members.mean()),
                mean_map=mean_map,
                distance=_tv(mean_map, main_mean),
                inside=_finite_mean(scalars["true_inside"][rows[members]]),
                on_object=_finite_mean(scalars["true_on_object"][rows[members]]),
                peak_region=REGION_NAMES_4[mode],
                peak_share=float(counts[mode] / members.sum()),
                concentration=top_share(mean_map),
                spread=float(distances.mean()),
                border=float((mean_map * border).sum() / max(float(mean_map.sum()), 1e-30)),
                examples=examples,
            )
        )


def _finite_mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def flags_for(report: ClassReport, thresholds: Thresholds = THRESHOLDS) -> list[Flag]:
    """The flags of one class (see the module docstring and :class:`Thresholds`)."""
    t = thresholds
    flags: list[Flag] = []
    if (
        np.isfinite(report.peak_share)
        and np.isfinite(report.peak_share_others)
        and report.peak_share >= t.fixed_peak_share
        and report.peak_share - report.peak_share_others >= t.fixed_peak_excess
    ):
        flags.append(
            Flag(
                "fixed-place",
                f"its maps peak in the {report.peak_region} sixteenth of the image in {report.peak_share:.0%} of its "
                f"images (the other classes' maps: {report.peak_share_others:.0%}); the mean map holds "
                f"{report.concentration:.0%} of its mass in a tenth of the image",
                {
                    "region": report.peak_region,
                    "peak_share": _round(report.peak_share),
                    "peak_share_others": _round(report.peak_share_others),
                    "concentration": _round(report.concentration),
                    "spread": _round(report.spread),
                },
            )
        )
    if (
        report.lift is not None
        and report.lift_others is not None
        and report.mask_area <= t.off_object_max_area
        and report.lift < t.off_object_lift
        and report.lift < t.off_object_relative * report.lift_others
    ):
        flags.append(
            Flag(
                "off-object",
                f"only {report.inside:.0%} of its evidence lies on the object, which covers {report.mask_area:.0%} of "
                f"the image: {report.lift:.1f} times a uniform map's share (the other classes: "
                f"{report.lift_others:.1f} times)",
                {
                    "inside": _round(report.inside),
                    "mask_area": _round(report.mask_area),
                    "lift": _round(report.lift),
                    "lift_others": _round(report.lift_others),
                    "inside_others": _round(report.inside_others),
                },
            )
        )
    main = report.clusters[0] if report.clusters else None
    for cluster in report.clusters[1:]:
        if not (
            t.cluster_min_share <= cluster.share <= t.cluster_max_share
            and cluster.size >= t.cluster_min_images
            and cluster.distance >= t.cluster_distance
        ):
            continue
        if cluster.inside is None or main.inside is None or cluster.inside >= t.cluster_inside_ratio * main.inside:
            continue  # without masks a cluster of objects at another place cannot be told from another strategy
        where = f" with {cluster.inside:.0%} of its evidence on the object (main cluster: {main.inside:.0%})"
        flags.append(
            Flag(
                "clever-hans",
                f"SpRAy splits its maps into {len(report.clusters)} clusters; {cluster.share:.0%} of its images "
                f"({cluster.size}) look at the {cluster.peak_region} instead of the main cluster's "
                f"{main.peak_region}{where}",
                {
                    "cluster": cluster.index,
                    "share": _round(cluster.share),
                    "images": cluster.size,
                    "distance_to_main": _round(cluster.distance),
                    "inside": _round(cluster.inside),
                    "main_inside": _round(main.inside),
                    "examples": cluster.examples,
                },
            )
        )
        break
    return flags


def _galleries(report: ClassReport, reservoir: _Reservoir, scalars: dict) -> dict[str, list[int]]:
    """good: right and focused (on the object, or in the main cluster); bad: wrong, most confident first
    (shown with the map of the class it chose); ugly: right but looking elsewhere (least on the object, or
    in another cluster)."""
    mine = scalars["label"] == report.index
    positions = scalars["position"][mine]
    correct = scalars["correct"][mine].astype(bool)
    inside = scalars["true_inside"][mine]
    area = scalars["mask_area"][mine]
    confidence = scalars["label_probability"][mine]
    wrong = np.flatnonzero(~correct)
    bad = [int(positions[i]) for i in wrong[np.argsort(-scalars["probability"][mine][wrong])][:GALLERY]]
    with_mask = correct & np.isfinite(inside)
    if with_mask.sum() >= max(1, correct.sum() // 2):
        lift = np.where(with_mask, inside / np.where(area > 0, area, 1), np.nan)
        order = np.flatnonzero(with_mask)[np.argsort(-lift[with_mask])]
        good = [int(positions[i]) for i in order[:GALLERY]]
        elsewhere = np.flatnonzero(with_mask & (inside < area))  # less on the object than a random map
        ugly = [int(positions[i]) for i in elsewhere[np.argsort(inside[elsewhere])][:GALLERY]]
        return {"good": good, "bad": bad, "ugly": ugly}
    cluster_of: dict[int, int] = {}
    if report.spray is not None:
        cluster_of = dict(zip(reservoir.positions, report.spray.labels.tolist(), strict=True))
    right = [(int(p), float(q)) for p, q, ok in zip(positions, confidence, correct, strict=True) if ok]
    main = sorted((p for p in right if cluster_of.get(p[0], 0) == 0), key=lambda item: -item[1])
    good = [p for p, _ in main[:GALLERY]]
    others = [(p, q) for p, q in right if cluster_of.get(p, 0) != 0]
    ugly = [p for p, _ in sorted(others, key=lambda item: -item[1])[:GALLERY]]
    return {"good": good, "bad": bad, "ugly": ugly}
