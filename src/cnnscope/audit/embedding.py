"""Feature embeddings of a dataset: where the model puts each image, and which classes its features confuse.

    result = embed(model, "data/", out="embed-out")            # runs the audit step once, then embeds
    result = embed(None, "audit-out/", out="embed-out")        # reuses an audit's stored features, no second pass
    result.summary()                                           # the JSON of ``cnnscope embed --json``

The features are the audit store's ``features`` column (the penultimate features, or the global average of
``layer``'s output), so an embedding is a query over the same records as the audit report, and an audit
folder is embedded without reading a single image again. They are projected to 2-D by

- ``tsne``: scikit-learn's Barnes-Hut t-SNE after a PCA to ``pca_dims`` dimensions (van der Maaten and
  Hinton, 2008; the PCA first is the usual speed-up and removes noise dimensions);
- ``umap``: umap-learn's UMAP after the same PCA (McInnes et al., 2018; optional: ``pip install
  'cnnscope[umap]'``), the one to use from about 20,000 points on;
- ``pca``: the first two principal components (instant, linear, a first look).

Every projection is seeded: the same store and seed give the same picture. Above ``LANDMARKS`` (20,000)
points, t-SNE and UMAP lay out a seeded sample of 20,000 landmarks and place every other point at the
distance-weighted mean of its 5 nearest landmarks (in the PCA space): the layout's cost stops growing with the
dataset, and the neighbour search that places the rest is one brute-force pass (BLAS). Above
``PURITY_SAMPLE`` points the purity is likewise the mean over a stratified seeded sample of 20,000 images
(their neighbours searched among all images).

The neighbourhood purity of a class is the mean, over its images, of the share of each image's ``k``
nearest neighbours (in the PCA-reduced feature space, not in the 2-D picture) that have its own class: 1 means
the features keep the class apart, ``1 / classes`` is chance. The overlap of two classes a and b is the mean
of the share of a's neighbours that are b and the share of b's neighbours that are a: the pairs with the
largest overlap are the ones the features confuse.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["METHODS", "Embedding", "EmbeddingResult", "embed", "embed_store", "neighbourhood_purity", "project"]

METHODS = ("tsne", "umap", "pca")
#: Points whose thumbnails and maps go into the HTML (misclassified first); the others are drawn without.
MAX_THUMBNAILS = 20_000
#: Above this many points the audit report's embedding uses UMAP (or PCA without umap-learn), not t-SNE.
REPORT_TSNE_LIMIT = 5_000
#: Below this many points the projections and the neighbour search run on one thread (see ``_threads``).
SMALL = 5_000
#: Above this many points, t-SNE and UMAP run on this many landmarks (a seeded sample) and every other point
#: is placed at the distance-weighted mean of its nearest landmarks' positions (in the PCA space).
LANDMARKS = 20_000
#: Above this many points the purity is the mean over this many seeded sample points (their neighbours are
#: searched among all points); its standard error is then below 0.004.
PURITY_SAMPLE = 20_000


def require_umap():
    """The ``umap`` module, or the one-line error saying how to install it."""
    try:
        import umap
    except ImportError:
        raise InputError("--method umap needs umap-learn: pip install 'cnnscope[umap]' (or use tsne or pca)") from None
    return umap


def _check_features(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise InputError(f"the features must be a (points, dimensions) array, got shape {features.shape}")
    if features.shape[0] < 3:
        raise InputError(f"an embedding needs at least 3 images, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise InputError("the features hold NaN or infinite values; the model's outputs overflowed")
    return features.astype(np.float32, copy=False)


def _threads(count: int):
    """One OpenMP/BLAS thread for small problems: there, threads only add their start and spin-wait cost (a
    t-SNE of 80 points took 16 s instead of 1 s on a busy 2-core machine); large ones keep every core."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    return threadpool_limits(1) if count < SMALL else nullcontext()


def reduce(features: np.ndarray, dims: int = 50, seed: int = 0) -> np.ndarray:
    """The features centred and projected on their first ``dims`` principal components (seeded)."""
    from sklearn.decomposition import PCA

    features = _check_features(features)
    dims = min(dims, features.shape[0], features.shape[1])
    if dims == features.shape[1] and features.shape[0] > dims:
        return features - features.mean(axis=0, keepdims=True)
    solver = "randomized" if features.shape[0] > 2000 and dims < 0.8 * min(features.shape) else "full"
    return PCA(n_components=dims, svd_solver=solver, random_state=seed).fit_transform(features).astype(np.float32)


def project(
    features: np.ndarray,
    method: str = "tsne",
    *,
    seed: int = 0,
    pca_dims: int = 50,
    perplexity: float = 30.0,
    neighbours: int = 15,
    landmarks: int | None = LANDMARKS,
) -> np.ndarray:
    """(N, D) features -> (N, 2) float32 coordinates by ``method`` (``tsne``, ``umap`` or ``pca``), seeded.
    With more than ``landmarks`` points (None: never), t-SNE and UMAP place a seeded sample of ``landmarks``
    points and the rest by their 5 nearest landmarks (distance-weighted, in the PCA space)."""
    if method not in METHODS:
        raise InputError(f"unknown embedding method '{method}'; choose one of {', '.join(METHODS)}")
    features = _check_features(features)
    count = features.shape[0]
    if method == "pca":
        reduced = reduce(features, 2, seed)
        if reduced.shape[1] < 2:
            reduced = np.concatenate([reduced, np.zeros((count, 2 - reduced.shape[1]), np.float32)], axis=1)
        return reduced[:, :2].astype(np.float32)
    with _threads(count):
        reduced = reduce(features, pca_dims, seed)
        if landmarks is None or count <= landmarks:
            return _project(reduced, method, seed, perplexity, neighbours)
        from sklearn.neighbors import NearestNeighbors

        chosen = np.sort(np.random.default_rng(seed).choice(count, size=landmarks, replace=False))
        placed = _project(reduced[chosen], method, seed, perplexity, neighbours)
        distance, index = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(reduced[chosen]).kneighbors(reduced)
        weights = 1.0 / np.maximum(distance, 1e-6)
        points = (placed[index] * weights[..., None]).sum(axis=1) / weights.sum(axis=1, keepdims=True)
        points[chosen] = placed
        return points.astype(np.float32)


def _project(reduced, method, seed, perplexity, neighbours) -> np.ndarray:
    count = reduced.shape[0]
    if method == "umap":
        umap = require_umap()
        import warnings

        with warnings.catch_warnings():  # umap warns that a random_state disables its parallel mode: intended
            warnings.simplefilter("ignore", UserWarning)
            model = umap.UMAP(n_neighbors=min(neighbours, count - 1), random_state=seed, init="spectral")
            return np.asarray(model.fit_transform(reduced), dtype=np.float32)
    from sklearn.manifold import TSNE

    tsne = TSNE(
        n_components=2,
        perplexity=float(min(perplexity, max(1.0, (count - 1) / 3))),
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    return tsne.fit_transform(reduced).astype(np.float32)


def neighbourhood_purity(
    features: np.ndarray, labels: np.ndarray, *, k: int = 10, seed: int = 0, pca_dims: int = 50
) -> tuple[dict[int, float], np.ndarray, np.ndarray]:
    """Per class, the mean share of its images' ``k`` nearest neighbours of its own class (in the PCA-reduced
    feature space, the image itself left out); also the per-image purity and the (classes x classes) matrix of
    neighbour shares ``shares[a, b]`` (the share of class a's neighbours that are of class b), classes in the
    order of ``np.unique(labels)``."""
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels)
    count = len(labels)
    k = max(1, min(k, count - 1))
    queries = np.arange(count)
    if count > PURITY_SAMPLE:  # every class keeps at least a few queries: the sample is stratified
        rng = np.random.default_rng(seed)
        queries = np.sort(
            np.concatenate(
                [
                    rng.permutation(np.flatnonzero(labels == c))[: max(20, round(PURITY_SAMPLE * np.mean(labels == c)))]
                    for c in np.unique(labels)
                ]
            )
        )
    with _threads(count):
        reduced = reduce(features, pca_dims, seed)
        _, index = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(reduced).kneighbors(reduced[queries])
    neighbours = _without_self(index, k, queries)
    same = labels[neighbours] == labels[queries][:, None]
    per_image = np.full(count, np.nan)
    per_image[queries] = same.mean(axis=1)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(classes), len(classes)))
    np.add.at(counts, (np.repeat(inverse[queries], k), inverse[neighbours].reshape(-1)), 1.0)
    shares = counts / counts.sum(axis=1, keepdims=True)
    purity = {int(c): float(np.nanmean(per_image[inverse == i])) for i, c in enumerate(classes)}
    return purity, per_image, shares


def _without_self(index: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` neighbours of each query row (``rows``: the queries' own indices), the row itself removed
    (wherever duplicates put it)."""
    rows = (np.arange(len(index)) if rows is None else np.asarray(rows))[:, None]
    keep = index != rows
    first_k = np.cumsum(keep, axis=1) <= k
    picked = index[keep & first_k]
    return picked.reshape(len(index), k)


@dataclass
class Embedding:
    """The 2-D picture of a store's features and what it says about the classes.

    ``points`` (N, 2); ``positions``, ``labels``, ``predicted``, ``correct``, ``top3``, ``top3_probability``
    per point (store order); ``purity`` per class index; ``per_image_purity``; ``shares`` the neighbour-share
    matrix over ``classes`` (the class indices present); ``overlaps`` the most overlapping class pairs.
    """

    points: np.ndarray
    positions: np.ndarray
    keys: list[str]
    labels: np.ndarray
    predicted: np.ndarray
    correct: np.ndarray
    top3: np.ndarray
    top3_probability: np.ndarray
    method: str
    seed: int
    k: int
    purity: dict[int, float]
    per_image_purity: np.ndarray
    classes: np.ndarray
    shares: np.ndarray
    class_names: list[str]
    seconds: float
    overlaps: list[dict] = field(default_factory=list)

    def summary(self, top: int = 10) -> dict:
        """Purity per class and the most overlapping pairs (JSON-ready)."""
        names = self.class_names
        classes = []
        for i, c in enumerate(self.classes):
            members = self.labels == c
            classes.append(
                {
                    "index": int(c),
                    "name": names[int(c)],
                    "images": int(members.sum()),
                    "purity": round(self.purity[int(c)], 4),
                    "accuracy": round(float(self.correct[members].mean()), 4),
                    "nearest_other": _nearest_other(self.shares[i], i, self.classes, names),
                }
            )
        return {
            "method": self.method,
            "seed": self.seed,
            "points": len(self.points),
            "k": self.k,
            "purity": round(float(np.nanmean(self.per_image_purity)), 4),
            "chance": round(
                float(((np.bincount(np.searchsorted(self.classes, self.labels)) / len(self.labels)) ** 2).sum()), 4
            ),
            "classes": classes,
            "overlapping": self.overlaps[:top],
            "seconds": round(self.seconds, 3),
        }


def _nearest_other(row: np.ndarray, i: int, classes: np.ndarray, names: list[str]) -> dict | None:
    others = [(row[j], j) for j in range(len(row)) if j != i]
    if not others:
        return None
    share, j = max(others)
    return {"name": names[int(classes[j])], "share": round(float(share), 4)}


def overlapping_pairs(shares: np.ndarray, classes: np.ndarray, names: list[str]) -> list[dict]:
    """Every class pair with any overlap, the largest first: ``overlap`` is the mean of a->b and b->a shares."""
    pairs = []
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            overlap = 0.5 * (shares[a, b] + shares[b, a])
            if overlap > 0:
                pairs.append(
                    {
                        "classes": [names[int(classes[a])], names[int(classes[b])]],
                        "indices": [int(classes[a]), int(classes[b])],
                        "overlap": round(float(overlap), 4),
                        "a_to_b": round(float(shares[a, b]), 4),
                        "b_to_a": round(float(shares[b, a]), 4),
                    }
                )
    return sorted(pairs, key=lambda pair: -pair["overlap"])


def embed_arrays(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    predicted: np.ndarray | None = None,
    class_names: list[str] | None = None,
    method: str = "tsne",
    seed: int = 0,
    k: int = 10,
    positions: np.ndarray | None = None,
    keys: list[str] | None = None,
    top3: np.ndarray | None = None,
    top3_probability: np.ndarray | None = None,
    **projection,
) -> Embedding:
    """The embedding and the purity of in-memory features (what :func:`embed_store` does on a store's columns)."""
    features = _check_features(features)
    labels = np.asarray(labels, dtype=np.int64)
    count = len(labels)
    if features.shape[0] != count:
        raise InputError(f"{features.shape[0]} feature vectors for {count} labels")
    if k < 1:
        raise InputError(f"k (neighbours for the purity) must be at least 1, got {k}")
    predicted = labels if predicted is None else np.asarray(predicted, dtype=np.int64)
    names = class_names or [str(i) for i in range(int(max(labels.max(), predicted.max())) + 1)]
    started = time.perf_counter()
    points = project(features, method, seed=seed, **projection)
    purity, per_image, shares = neighbourhood_purity(features, labels, k=k, seed=seed)
    classes = np.unique(labels)
    result = Embedding(
        points=points,
        positions=np.arange(count) if positions is None else np.asarray(positions),
        keys=keys if keys is not None else [str(i) for i in range(count)],
        labels=labels,
        predicted=predicted,
        correct=predicted == labels,
        top3=top3 if top3 is not None else predicted[:, None],
        top3_probability=top3_probability if top3_probability is not None else np.ones((count, 1), np.float32),
        method=method,
        seed=seed,
        k=min(k, count - 1),
        purity=purity,
        per_image_purity=per_image,
        classes=classes,
        shares=shares,
        class_names=names,
        seconds=0.0,
    )
    result.overlaps = overlapping_pairs(shares, classes, names)
    result.seconds = time.perf_counter() - started
    return result


def _column(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def read_features(store) -> dict:
    """The columns an embedding needs from every finished shard of ``store`` (features, labels, predictions,
    top-3), in source order; InputError when the store has no features."""
    parts: dict[str, list] = {n: [] for n in ("position", "key", "label", "predicted", "top3", "top3_p", "features")}
    for table in store.batches(["position", "key", "label", "predicted", "top5", "top5_probability", "features"]):
        if table.num_rows == 0:
            continue
        column = table.column("features")
        if column.null_count:
            raise InputError(
                "this audit stored no features (a model whose forward could not be hooked); embed the images "
                "with --layer naming a layer (cnnscope layers lists them)"
            )
        flat = column.combine_chunks()
        width = len(flat[0])
        parts["features"].append(flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, width))
        top5 = table.column("top5").combine_chunks()
        top5_p = table.column("top5_probability").combine_chunks()
        depth = len(top5[0])
        parts["top3"].append(top5.flatten().to_numpy(zero_copy_only=False).reshape(-1, depth)[:, :3])
        parts["top3_p"].append(top5_p.flatten().to_numpy(zero_copy_only=False).reshape(-1, depth)[:, :3])
        for name in ("position", "label", "predicted"):
            parts[name].append(_column(table, name))
        parts["key"].extend(table.column("key").to_pylist())
    if not parts["position"]:
        raise InputError(f"the audit in '{store.root}' has no finished images to embed")
    return {name: (values if name == "key" else np.concatenate(values)) for name, values in parts.items()}


def embed_store(
    store, labels: list[str], *, method: str = "tsne", seed: int = 0, k: int = 10, **projection
) -> Embedding:
    """The embedding of an audit store's stored features (no image is read again)."""
    columns = read_features(store)
    return embed_arrays(
        columns["features"],
        columns["label"],
        predicted=columns["predicted"],
        class_names=[_short(name) for name in labels],
        method=method,
        seed=seed,
        k=k,
        positions=columns["position"],
        keys=columns["key"],
        top3=columns["top3"],
        top3_probability=columns["top3_p"],
        **projection,
    )


def _short(name: str) -> str:
    from ..models.labels import short_name

    return short_name(name)


def report_method(count: int) -> str:
    """The projection the audit report uses for ``count`` points: t-SNE up to :data:`REPORT_TSNE_LIMIT`,
    then UMAP when installed, else PCA."""
    if count <= REPORT_TSNE_LIMIT:
        return "tsne"
    try:
        import umap  # noqa: F401
    except ImportError:
        return "pca"
    return "umap"


# -- pictures of the store: the scatter's data ----------------------------------------------------------------
def cluster_of(store, embedding: Embedding, classes_reports, map_size: int) -> np.ndarray | None:
    """Each point's SpRAy cluster within its class (0: the class's main strategy), by the nearest cluster mean
    map (total variation), or None when the audit found no clusters."""
    import torch

    from .stats import normalized

    means = {r.index: np.stack([c.mean_map for c in r.clusters]) for r in classes_reports or [] if r.clusters}
    if not means:
        return None
    row_of = {int(p): i for i, p in enumerate(embedding.positions.tolist())}
    cluster = np.zeros(len(embedding.positions), dtype=np.int32)
    for table in store.batches(["position", "label", "map_true"]):
        if table.num_rows == 0:
            continue
        positions = _column(table, "position")
        owners = _column(table, "label")
        cells = table.column("map_true").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        maps = torch.from_numpy(cells.reshape(len(positions), map_size, map_size).astype(np.float64))
        shares = normalized(maps)[0].numpy()
        for position, owner, share in zip(positions, owners, shares, strict=True):
            centres = means.get(int(owner))
            if centres is not None and int(position) in row_of:
                distance = 0.5 * np.abs(centres - share[None]).sum(axis=(1, 2))
                cluster[row_of[int(position)]] = int(np.argmin(distance))
    return cluster


def pick_thumbnails(embedding: Embedding, limit: int = MAX_THUMBNAILS, seed: int = 0) -> np.ndarray:
    """Rows that get a thumbnail: all when there are at most ``limit``; else the misclassified first (up to
    half the budget), then a seeded random sample of the rest."""
    count = len(embedding.positions)
    if count <= limit:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(~embedding.correct)
    wrong = rng.permutation(wrong)[: limit // 2]
    rest = np.setdiff1d(np.arange(count), wrong)
    chosen = np.concatenate([wrong, rng.choice(rest, size=limit - len(wrong), replace=False)])
    return np.sort(chosen)


def read_pictures(
    store, embedding: Embedding, rows: np.ndarray, map_size: int
) -> tuple[list[bytes | None], np.ndarray]:
    """The stored thumbnails (JPEG bytes) and predicted-class maps of ``rows`` (row order)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = embedding.positions[rows]
    slot = {int(p): i for i, p in enumerate(wanted.tolist())}
    thumbnails: list[bytes | None] = [None] * len(rows)
    maps = np.zeros((len(rows), map_size, map_size), np.float32)
    value_set = pa.array(wanted.astype(np.int64), type=pa.int64())
    for table in store.batches(["position", "thumbnail", "map_pred"]):
        chosen = table.filter(pc.is_in(table.column("position"), value_set=value_set))
        if chosen.num_rows == 0:
            continue
        positions = _column(chosen, "position")
        cells = chosen.column("map_pred").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        found = cells.reshape(len(positions), map_size, map_size)
        for i, (position, picture) in enumerate(zip(positions, chosen.column("thumbnail").to_pylist(), strict=True)):
            thumbnails[slot[int(position)]] = picture
            maps[slot[int(position)]] = found[i]
    return thumbnails, maps


def scatter_data(
    store, embedding: Embedding, map_size: int, classes_reports=None, max_thumbnails: int = MAX_THUMBNAILS
):
    """The :class:`~cnnscope.render.scatter.ScatterData` of an embedding of ``store``."""
    from ..render.scatter import ScatterData

    rows = pick_thumbnails(embedding, max_thumbnails, embedding.seed)
    thumbnails, maps = read_pictures(store, embedding, rows, map_size)
    return ScatterData(
        points=embedding.points,
        labels=embedding.labels,
        predicted=embedding.predicted,
        class_names=embedding.class_names,
        names=[Path(key).name for key in embedding.keys],
        top3=embedding.top3,
        top3_probability=embedding.top3_probability,
        cluster=cluster_of(store, embedding, classes_reports, map_size),
        thumbnail_rows=rows,
        thumbnails=thumbnails,
        maps=maps,
        title=f"{embedding.method} of {len(embedding.points)} images (purity {embedding.summary()['purity']:.2f})",
    )


# -- the command: embed a dataset or an audit folder ------------------------------------------------------
@dataclass
class EmbeddingResult:
    """What ``cnnscope embed`` wrote: the ``embedding``, the ``html`` scatter, the ``png`` beside it, the
    ``table`` of coordinates (Parquet), the ``store`` it read, and whether the images were read (``computed``)."""

    embedding: Embedding
    out: Path
    store: Path
    html: Path | None
    png: Path | None
    table: Path
    computed: bool
    engine: str
    feature_source: str

    def summary(self) -> dict:
        return {
            **self.embedding.summary(),
            "features": self.feature_source,
            "store": str(self.store),
            "computed": self.computed,
            "engine": self.engine,
            "out": str(self.out),
            "html": str(self.html) if self.html else None,
            "png": str(self.png) if self.png else None,
            "table": str(self.table),
        }


def is_audit_folder(path: str | os.PathLike) -> bool:
    from .store import MANIFEST

    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def open_audit(path: str | os.PathLike):
    """An existing audit folder as a :class:`~cnnscope.audit.store.Store` (read as it is) and its manifest."""
    from .store import MANIFEST, Store

    root = Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"'{root / MANIFEST}' cannot be read ({exc}); is '{root}' an audit folder?") from None
    if "identity" not in manifest or "labels" not in manifest:
        raise InputError(f"'{root}' is not a cnnscope audit folder (its manifest has no identity or labels)")
    store = Store(root, manifest["identity"], total=manifest["total"], shard_size=manifest["shard_size"], resume=True)
    return store, manifest


def embed(
    model=None,
    data=None,
    *,
    out: str | os.PathLike = "cnnscope-embed",
    method: str = "tsne",
    layer=None,
    seed: int = 0,
    k: int = 10,
    explain: str = "gradcam",
    engine: str = "local",
    address: str | None = None,
    actors: int | None = None,
    num_gpus: float = 0.0,
    batch_size: int = 32,
    limit: int | None = None,
    resume: bool = True,
    mapping=None,
    masks=None,
    max_thumbnails: int = MAX_THUMBNAILS,
    html: bool = True,
    png: bool = True,
    quiet: bool = False,
    on_problem=None,
    **projection,
) -> EmbeddingResult:
    """Embed ``data``'s features and write ``out/embedding.html``, ``.png`` and ``.parquet``.

    Args:
        model: the model (anything ``load_model`` takes); unused when ``data`` is an audit folder.
        data: an audit folder (its stored features are reused: no image is read again), or anything
            :func:`cnnscope.audit.audit` takes (the audit step runs once, its store goes to ``out``).
        method: ``tsne``, ``umap`` or ``pca``; seed: the projection's seed; k: neighbours for the purity.
        layer: take the features from this layer (global average of its output) instead of the penultimate
            features; explain: the method whose maps the scatter shows on click.
        engine, address, actors, num_gpus: ``local`` or ``ray`` (see :mod:`cnnscope.audit.ray_engine`).
        max_thumbnails: points whose thumbnail and map go into the HTML (misclassified first).
    """
    from . import audit as run_audit
    from .stats import MAP_SIZE

    if method not in METHODS:
        raise InputError(f"unknown embedding method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "umap":
        require_umap()
    if data is None:
        raise InputError("give the data to embed: a folder of class folders, a CSV, or an audit folder")
    out_dir = Path(out)
    classes_reports = None
    if isinstance(data, (str, os.PathLike)) and is_audit_folder(data):
        if layer is not None:
            raise InputError(
                f"'{data}' is an audit folder: its features are stored, --layer cannot change them; embed the "
                "images themselves to use another layer"
            )
        store, manifest = open_audit(data)
        labels = manifest["labels"]
        map_size = manifest["identity"]["method"].get("map_size", MAP_SIZE)
        computed = False
        feature_layer = manifest["identity"]["method"].get("features")
        from .aggregate import aggregate

        names = {int(key): value for key, value in manifest.get("dataset_names", {}).items()}
        classes_reports = aggregate(store, labels, names, map_size)
    else:
        if model is None:
            raise InputError("give --model: the images are embedded with the model's features")
        result = run_audit(
            model,
            data,
            method=explain,
            out=out_dir / "store",
            features=layer,
            limit=limit,
            resume=resume,
            batch_size=batch_size,
            report=False,
            quiet=quiet,
            engine=engine,
            address=address,
            actors=actors,
            num_gpus=num_gpus,
            mapping=mapping,
            masks=masks,
            on_problem=on_problem,
        )
        store, manifest = open_audit(result.out)
        labels = result.labels
        map_size = manifest["identity"]["method"].get("map_size", MAP_SIZE)
        classes_reports = result.classes
        computed = True
        feature_layer = manifest["identity"]["method"].get("features")
    embedding = embed_store(store, labels, method=method, seed=seed, k=k, **projection)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = png_path = None
    if html or png:
        from ..render.scatter import scatter_html, scatter_png

        picture = scatter_data(store, embedding, map_size, classes_reports, max_thumbnails)
        if html:
            html_path = out_dir / "embedding.html"
            _write_text(html_path, scatter_html(picture))
        if png:
            png_path = out_dir / "embedding.png"
            scatter_png(picture, png_path)
    table_path = out_dir / "embedding.parquet"
    _write_points(embedding, table_path)
    return EmbeddingResult(
        embedding=embedding,
        out=out_dir,
        store=store.root,
        html=html_path,
        png=png_path,
        table=table_path,
        computed=computed,
        engine=engine if computed else "none (stored features)",
        feature_source=f"global average of {feature_layer}"
        if feature_layer
        else "penultimate (input of the last linear layer)",
    )


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def _write_points(embedding: Embedding, path: Path) -> None:
    """The coordinates and the per-image purity as Parquet (position, key, x, y, label, predicted, purity)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "position": pa.array(embedding.positions.astype(np.int64)),
            "key": pa.array(embedding.keys, type=pa.string()),
            "x": pa.array(embedding.points[:, 0]),
            "y": pa.array(embedding.points[:, 1]),
            "label": pa.array(embedding.labels.astype(np.int32)),
            "predicted": pa.array(embedding.predicted.astype(np.int32)),
            "purity": pa.array(embedding.per_image_purity.astype(np.float32)),
        },
        metadata={"cnnscope": "embedding", "method": embedding.method, "seed": str(embedding.seed)},
    )
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temporary)
    temporary.replace(path)
