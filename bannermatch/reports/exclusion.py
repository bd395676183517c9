"""Exclusions: banners kept out of match lists (a query's own duplicates, banners with issues); pass one as
``exclude=`` to find_matches, query or show_matches."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BannermatchError
from ..matches import Matches
from ..store import FeatureSet
from .duplicates import Duplicates
from .neighbours import ROWS


@dataclass
class Exclusion:
    """Banners kept out of match lists: ``banned`` ones are never a match, and a banner never matches the other
    members of its own duplicate group. Pass it as ``exclude=`` to find_matches, query or show_matches."""

    features: FeatureSet
    banned: np.ndarray  # bool [N]
    group: np.ndarray  # int [N], duplicate group number, -1 for none
    label: str

    def top_k(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None,
              device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of ``queries`` among the allowed banners; ``rows[i]``: query i's own row (itself and its
        group are left out), or None for new images."""
        from ..recipe import resolve_device

        dev = resolve_device(device)
        db = torch.from_numpy(np.ascontiguousarray(self.features.features, np.float32)).to(dev)
        banned = torch.from_numpy(self.banned).to(dev)
        group = torch.from_numpy(self.group).to(dev)
        out_idx = np.empty((len(queries), k), np.int64)
        out_val = np.empty((len(queries), k), np.float32)
        for start in range(0, len(queries), ROWS):
            q = torch.as_tensor(np.asarray(queries[start:start + ROWS], np.float32)).to(dev)
            sims = q @ db.T
            sims[:, banned] = -torch.inf
            if rows is not None:
                own = torch.from_numpy(np.asarray(rows[start:start + ROWS])).to(dev)
                same = (group[None, :] == group[own][:, None]) & (group[own][:, None] >= 0)
                sims[same] = -torch.inf
                sims[torch.arange(len(q), device=dev), own] = -torch.inf
            if k > sims.shape[1]:
                raise BannermatchError(f"k={k} is larger than the {sims.shape[1]} banners there are")
            vals, idx = torch.topk(sims, k, dim=1)
            if torch.isinf(vals).any():
                left = int(torch.isfinite(sims).sum(1).min())
                raise BannermatchError(f"only {left} banners are left to match after the exclusions ({self.label}); "
                                       "ask for a smaller k")
            out_idx[start:start + len(q)], out_val[start:start + len(q)] = idx.cpu().numpy(), vals.cpu().numpy()
        return out_idx, out_val

    def apply(self, matches: Matches, device: str | None = None) -> Matches:
        """The same matches with the excluded banners replaced by the next allowed ones (rows that had none are
        kept as they are)."""
        nb, sc = matches.neighbours.copy(), matches.scores.copy()
        own = (self.group[nb] == self.group[:, None]) & (self.group[:, None] >= 0)
        affected = np.flatnonzero((self.banned[nb] | own).any(axis=1))
        if len(affected):
            nb[affected], sc[affected] = self.top_k(self.features.features[affected], matches.k, affected, device)
        return Matches(self.features, nb, sc, matches.precision, matches.backend, excluded=self.label)


def exclusion(features: FeatureSet, duplicates: Duplicates | None = None, banned: Iterable[str] = (),
              label: str = "") -> Exclusion:
    """An :class:`Exclusion`: each banner's own ``duplicates`` group, and the ``banned`` keys (e.g.
    ``issues.keys_with("placeholder", "dark")``), kept out of match lists."""
    index = features.index_map()
    mask = np.zeros(len(features.keys), bool)
    mask[[index[k] for k in banned if k in index]] = True
    group = np.full(len(features.keys), -1, np.int64)
    if duplicates is not None:
        for gi, g in enumerate(duplicates.groups):
            group[[index[k] for k in g.keys if k in index]] = gi
    parts = [f"own duplicates at cosine >= {duplicates.threshold:.3f}"] if duplicates is not None else []
    parts += [f"{int(mask.sum())} banners excluded"] if mask.any() else []
    return Exclusion(features, mask, group, label or "; ".join(parts) or "nothing excluded")
