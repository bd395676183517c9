"""Matches: the top-k neighbours of every banner of a feature set, computed once and kept beside the features.

A saved result is reused only for the very same features (the view, and each banner's key, bytes and the
sha256 of the segment its features were read from: see :attr:`~bannermatch.store.FeatureSet.content_id`) and
the same search settings, with at least the k asked for. Files are written under the store folder's lock and
read under it shared; the store removes those of features it no longer holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BannermatchError
from .files import atomic_write, file_digest, folder_lock
from .recipe import cpu_has_bf16, gpu_has_bf16, resolve_device
from .search import PRECISIONS, top_k_all_pairs, top_k_faiss
from .store import MATCHES, FeatureSet

log = logging.getLogger(__name__)

#: torch and faiss (IndexFlatIP): exact; faiss-hnsw: approximate, for collections past a few hundred thousand
BACKENDS = ("torch", "faiss", "faiss-hnsw")


@dataclass
class Matches:
    """Top-k neighbours of every banner of a feature set: row i belongs to ``features.keys[i]``."""

    features: FeatureSet
    neighbours: np.ndarray  # int64 [N, k], indices into features.keys
    scores: np.ndarray  # float32 [N, k], cosine similarity
    precision: str = "float32"
    backend: str = "torch"
    excluded: str = ""  # what was kept out of the lists (queries.Exclusion), "" for plain matches

    @property
    def k(self) -> int:
        return self.neighbours.shape[1]

    @property
    def path(self) -> Path:
        return matches_path(self.features, self.precision, self.backend, self.excluded)

    def of(self, key: str) -> list[tuple[str, float]]:
        i = self.features.index_of(key)
        return [(self.features.keys[j], float(s)) for j, s in zip(self.neighbours[i], self.scores[i])]

    def save(self) -> Path:
        path = self.path
        buffer = io.BytesIO()
        np.savez(buffer, neighbours=self.neighbours, scores=self.scores)
        data = buffer.getvalue()
        meta = {"k": self.k, "features": self.features.content_id, "rows": self.features.rows_id,
                "sha256": hashlib.sha256(data).hexdigest(), **({"excluded": self.excluded} if self.excluded else {})}
        with folder_lock(self.features.path):  # the pair is written together; the store's tidying waits
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, lambda fh: fh.write(data))
            atomic_write(path.with_suffix(".json"), lambda fh: fh.write(json.dumps(meta).encode()))
        return path


def matches_path(fs: FeatureSet, precision: str, backend: str, excluded: str = "") -> Path:
    """Where matches are kept: one file per collection (a sample has its own), strategy, search setting and
    exclusion, if any (never over the plain matches that find_matches reuses)."""
    name = f"{fs.recipe.view}.{precision}.{backend}.{fs.content_id}"
    if excluded:
        name += ".x" + hashlib.sha256(excluded.encode()).hexdigest()[:8]
    return fs.path / MATCHES / f"{name}.npz"


def _load(features: FeatureSet, k: int, precision: str, backend: str) -> Matches | None:
    path = matches_path(features, precision, backend)
    if not path.parent.is_dir():
        return None
    try:
        with folder_lock(features.path, shared=True):  # the pair as one writer left it
            meta = json.loads(path.with_suffix(".json").read_text())
            if meta["features"] != features.content_id or meta["k"] < k:
                return None
            if file_digest(path) != meta["sha256"]:
                log.warning("%s: stored matches were changed or damaged; computing them again", path)
                return None
            with np.load(path, allow_pickle=False) as data:
                nb, sc = data["neighbours"], data["scores"]
    except (OSError, ValueError, KeyError):
        return None
    if nb.shape != sc.shape or len(nb) != len(features.keys):
        return None
    return Matches(features, nb[:, :k].astype(np.int64), sc[:, :k].astype(np.float32), precision, backend)


def resolve_precision(precision: str, device) -> str:
    """``auto``: bf16 where the hardware multiplies it natively (there it ran about 2x faster than fp32 with the
    same results after rescoring), fp32 elsewhere (bf16 ran 4.5x slower on an AVX2 CPU; BENCHMARKS.md run 6)."""
    if precision != "auto":
        return precision
    dev = resolve_device(device)
    native = gpu_has_bf16(dev) if dev.type == "cuda" else cpu_has_bf16()
    return "bfloat16" if native else "float32"


def find_matches(
    features: FeatureSet,
    k: int = 10,
    device: str | None = None,
    precision: str = "auto",
    backend: str = "torch",
    save: bool = True,
    exclude=None,
) -> Matches:
    """Top-k neighbours of every banner (itself excluded), reused from disk when already computed.

    ``exclude``: a :class:`~bannermatch.reports.Exclusion` (a banner's own duplicates, banners with issues):
    those are replaced by the next allowed neighbours; only the plain matches are saved.
    """
    if backend not in BACKENDS:
        raise BannermatchError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if precision not in ("auto", *PRECISIONS):
        raise BannermatchError(f"unknown precision {precision!r}; choose one of: auto, {', '.join(PRECISIONS)}")
    precision = "float32" if backend.startswith("faiss") else resolve_precision(precision, device)
    if save and (cached := _load(features, k, precision, backend)) is not None:
        return cached if exclude is None else exclude.apply(cached, device)
    n = len(features.keys)
    if k > n - 1:
        raise BannermatchError(f"k={k} is larger than the {n - 1} other banners there are to match")
    if backend.startswith("faiss"):
        idx, scores = top_k_faiss(features.features, features.features, k, np.arange(n), backend == "faiss-hnsw")
    else:
        idx, scores = top_k_all_pairs(features.features, k, device, precision)
    matches = Matches(features, idx, scores, precision, backend)
    if save:
        matches.save()
    return matches if exclude is None else exclude.apply(matches, device)
