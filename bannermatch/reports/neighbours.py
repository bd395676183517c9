"""The neighbours the reports read: the plain stored top-k, and every pair above a cosine threshold."""

from __future__ import annotations

import numpy as np
import torch

from ..matches import Matches, find_matches
from ..store import FeatureSet

ROWS = 512  # query rows per similarity block (bounded memory: 512 x N floats)


def plain_matches(features: FeatureSet, matches: Matches | None, k: int, device: str | None) -> Matches:
    """``matches`` when given and plain (filtered ones, an Exclusion's, lack pairs by design), else the top-``k``."""
    return matches if matches is not None and not matches.excluded else find_matches(features, k, device)


def near_pairs(features: FeatureSet, threshold: float, matches: Matches | None = None,
               device: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of banners at cosine >= ``threshold``: ``(i, j, score)`` with i < j, as indices into the keys.

    Read from the stored top-k neighbours; a banner whose k-th neighbour is still above the threshold may have
    more, so its whole row of similarities is computed (exactly) instead.
    """
    n = len(features.keys)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    m = plain_matches(features, matches, min(10, n - 1), device)
    hit = m.scores >= threshold
    rows, cols, scores = [np.nonzero(hit)[0]], [m.neighbours[hit]], [m.scores[hit]]
    full = np.flatnonzero(hit[:, -1]) if m.k < n - 1 else np.zeros(0, np.int64)
    x = torch.from_numpy(np.ascontiguousarray(features.features, np.float32))
    for start in range(0, len(full), ROWS):
        r = full[start:start + ROWS]
        sims = x[r] @ x.T
        sims[torch.arange(len(r)), torch.from_numpy(r)] = -torch.inf
        a, b = torch.nonzero(sims >= threshold, as_tuple=True)
        rows.append(r[a.numpy()])
        cols.append(b.numpy())
        scores.append(sims[a, b].numpy())
    i, j, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(scores)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(lo * n + hi, return_index=True)
    return lo[first], hi[first], s[first].astype(np.float32)
