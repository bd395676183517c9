"""Unique banners: every banner ranked by its nearest neighbour's similarity, the most unlike any other first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..display import show_grid
from ..errors import BannermatchError
from ..matches import Matches
from ..store import FeatureSet
from .neighbours import plain_matches
from .tables import write_csv, write_json


@dataclass
class UniqueBanners:
    """Every banner ranked by the similarity of its nearest neighbour, lowest (most unique) first."""

    features: FeatureSet
    keys: list[str]
    neighbours: list[str]  # each banner's nearest neighbour
    scores: np.ndarray  # float32, its cosine similarity, ascending
    n: int  # how many count as unique (shown, listed)

    @property
    def threshold(self) -> float:
        """The ``n`` most unique banners have no neighbour above this similarity (every other banner has one at
        least this close)."""
        return float(self.scores[min(self.n, len(self.scores)) - 1]) if len(self.scores) else float("nan")

    def records(self, n: int | None = None) -> list[dict]:
        n = self.n if n is None else n
        return [{"rank": r + 1, "key": key, "name": self.features.name(key), "score": round(float(s), 4),
                 "neighbour": nb, "neighbour_name": self.features.name(nb)}
                for r, (key, nb, s) in enumerate(zip(self.keys[:n], self.neighbours[:n], self.scores[:n]))]

    def to_json(self, path: str | Path) -> Path:
        return write_json(path, {"threshold": self.threshold, "n": self.n, "banners": len(self.keys),
                                  "recipe": self.features.recipe.label, "unique": self.records()})

    def to_csv(self, path: str | Path) -> Path:
        return write_csv(path, self.records(), ["rank", "key", "name", "score", "neighbour", "neighbour_name"])

    def summary(self) -> str:
        return (f"the {min(self.n, len(self.keys))} most unique of {len(self.keys)} banners have no neighbour "
                f"above cosine {self.threshold:.3f}")

    def rows(self, ncols: int = 6) -> list[tuple[str, list[tuple[str, float | None]]]]:
        shown = list(zip(self.keys[:self.n], self.scores[:self.n].tolist()))
        return [(f"ranks {r + 1}-{min(r + ncols, len(shown))}", shown[r:r + ncols]) for r in range(0, len(shown), ncols)]

    def show(self, ncols: int = 6, save: str | Path | None = None):
        """The ``n`` most unique banners, each with its nearest neighbour's similarity."""
        return show_grid(self.features, self.rows(ncols), ncols, save, empty="no banners")


def find_unique(features: FeatureSet, n: int = 24, matches: Matches | None = None,
                device: str | None = None) -> UniqueBanners:
    """Banners ranked by their nearest neighbour's cosine similarity, lowest first; the ``n`` first are shown."""
    if n < 1:
        raise BannermatchError("n must be at least 1")
    if len(features.keys) < 2:
        raise BannermatchError("ranking banners by their nearest neighbour needs at least two banners")
    m = plain_matches(features, matches, 1, device)
    order = np.argsort(m.scores[:, 0], kind="stable")
    return UniqueBanners(features, [features.keys[i] for i in order],
                         [features.keys[j] for j in m.neighbours[order, 0]], m.scores[order, 0].astype(np.float32), n)
