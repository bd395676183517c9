"""Duplicate banners: the same art under several app ids (a re-upload, a re-encode, a re-release with a title strip).

Three kinds of link join two banners: identical decoded pixels, perceptual hashes at most ``hash_distance`` bits
apart (re-encodes, resizes, tints: found in seconds without the model), and cosine similarity at least the
threshold (what the hash misses: title strips, crops). Nearly flat banners are linked by identical pixels alone.
Groups cannot chain: within each connected component of
links, banners are grouped by complete linkage, so every member is linked to every other member of its group.

The default threshold is calibrated on the collection itself, from both sides (:func:`calibrate_threshold`):
where edited copies of its banners sit (mild edits, embedded once and cached) and where each banner's nearest
*distinct* neighbour sits (the stored matches, hash and pixel links left out).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..display import show_grid
from ..errors import BannermatchError
from ..matches import Matches
from ..store import FeatureSet
from .issues import ISSUE_THRESHOLDS
from .measures import image_measures
from .neighbours import near_pairs, plain_matches
from .tables import write_csv, write_json

log = logging.getLogger(__name__)

#: Perceptual hashes at most this many bits apart (of 64) are the same picture. On 295 real-photo banners
#: (BENCHMARKS.md, duplicates), re-encodes, resizes, tints and +10% brightness stayed within 6 bits and 11 of 12
#: 5% crops within 8, while the closest two distinct pictures were 9 bits apart and 99% were 14 or more.
HASH_DISTANCE = 8
#: Calibration embeds at most a tenth of the collection's size in edited copies, and at most this many.
MAX_CALIBRATION_COPIES = 600
#: A group holding more than this share of the collection (and over 10 banners) is reported as suspect.
LARGE_GROUP = 0.02
CALIBRATION_FILE = "duplicate_calibration.json"
_CALIBRATION_VERSION = 1


# ------------------------------------------------------------------------------------------ the threshold

@dataclass
class Calibration:
    """How the cosine threshold was set: ``rule`` says it in words."""

    threshold: float
    rule: str
    copies: float | None = None  # median cosine of a mild edited copy to its original
    distinct: float | None = None  # median cosine of a banner to its nearest neighbour not linked by pixels or hash
    copy_recall: float | None = None  # share of the edited copies at or above the threshold
    n_copies: int = 0


def check_threshold(threshold: float) -> float:
    """A cosine threshold for duplicates: in (0, 1]."""
    if not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise BannermatchError(f"a duplicate threshold is a cosine similarity in (0, 1], not {threshold!r}")
    return float(threshold)


def _link_inputs(measures: dict[str, dict], keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each banner's decoded-pixel digest ("" if unreadable), perceptual hash as uint64, whether the hash may link
    it, and whether the cosine may. Nearly flat banners (under the low-information threshold) are linked by
    identical pixels alone: an empty picture's few DCT bits and its features both say only "empty", so two
    different flat placeholders hash alike and embed alike. A banner the measuring pass could not read has no hash
    and is linked by the cosine alone."""
    flat = ISSUE_THRESHOLDS["low_information"]
    pixels = np.array([measures.get(key, {}).get("pixels", "") for key in keys], dtype=object)
    hexes = [measures.get(key, {}).get("phash", "") for key in keys]
    by_cosine = np.array([measures.get(key, {}).get("entropy", flat) >= flat for key in keys])
    by_hash = by_cosine & np.array([bool(h) for h in hexes])
    return pixels, np.array([int(h, 16) if h else 0 for h in hexes], np.uint64), by_hash, by_cosine


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, as uint8."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1, dtype=np.uint8)


def hash_pairs(bits: np.ndarray, linkable: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of ``linkable`` banners whose hashes are at most ``max_distance`` bits apart.

    Two such hashes agree exactly on at least one of ``max_distance + 1`` disjoint slices of their 64 bits
    (pigeonhole), so banners are compared only within the groups that share a slice's value (multi-index hashing):
    at 8 bits, 9 slices of 7 bits, about 9 x N^2 / 256 comparisons instead of N^2 / 2 (100,000 random hashes: 8.7
    -> 0.5 s). Past 9 bits the slices are too narrow to sort anything out and every pair is compared."""
    idx = np.flatnonzero(linkable)
    h = bits[idx]
    n_slices = max_distance + 1
    if n_slices > 10:
        i, j = _close_pairs(h, max_distance)
        return idx[i], idx[j]
    found = []
    for bounds in np.array_split(np.arange(64), n_slices):
        key = (h >> np.uint64(bounds[0])) & np.uint64((1 << len(bounds)) - 1)
        order = np.argsort(key, kind="stable")
        edges = np.flatnonzero(np.diff(key[order])) + 1
        for group in np.split(order, edges):  # a stable sort: each group's banners in order, so i < j holds
            if len(group) > 1:
                i, j = _close_pairs(h[group], max_distance)
                found.append(group[i] * len(h) + group[j])
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = np.divmod(np.unique(np.concatenate(found)), len(h))  # a pair close on several slices: once
    return idx[i], idx[j]


def _close_pairs(h: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of the hashes ``h`` at most ``max_distance`` bits apart, all compared, a block of rows at
    a time (about 2**25 XORs: 256 MiB of uint64, whatever the number of hashes)."""
    n = len(h)
    rows = max(1, 2**25 // max(n, 1))
    out_i, out_j = [], []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = _popcount(h[start:stop, None] ^ h[None, start:])  # the upper triangle's rows
        a, b = np.divmod(np.flatnonzero(block <= max_distance), n - start)
        keep = a < b  # both count from start: the pair itself and the lower triangle are left out
        out_i.append(start + a[keep])
        out_j.append(start + b[keep])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def _pixel_and_hash_links(pixels: np.ndarray, bits: np.ndarray, by_hash: np.ndarray, a: np.ndarray, b: np.ndarray,
                          hash_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """For banners ``a`` and ``b`` (index arrays, broadcast): identical decoded pixels, and hashes at most
    ``hash_distance`` bits apart (between banners the hash may link)."""
    same = (pixels[a] == pixels[b]) & (pixels[a] != "")
    close = by_hash[a] & by_hash[b] & (_popcount(bits[a] ^ bits[b]) <= hash_distance)
    return same, close


def _nearest_distinct(matches: Matches, pixels: np.ndarray, bits: np.ndarray, by_hash: np.ndarray,
                      hash_distance: int) -> np.ndarray:
    """Each banner's cosine to its nearest stored neighbour that neither pixels nor the hash link to it (banners
    whose every stored neighbour is so linked are left out)."""
    nb, sc = matches.neighbours, matches.scores
    same, close = _pixel_and_hash_links(pixels, bits, by_hash, np.arange(len(nb))[:, None], nb, hash_distance)
    free = ~(same | close)
    found = free.any(axis=1)
    return sc[np.flatnonzero(found), free.argmax(axis=1)[found]]


def calibrate_threshold(
    features: FeatureSet,
    weights: str | Path | None = None,
    device: str | None = None,
    matches: Matches | None = None,
    hash_distance: int = HASH_DISTANCE,
    max_copies: int = MAX_CALIBRATION_COPIES,
    seed: int = 0,
    progress: bool = True,
) -> Calibration:
    """The cosine threshold for duplicates, from both sides of this collection under these features:

    - copies: a seeded sample of banners (a tenth of the collection, at most ``max_copies``), each under one of
      the mild edits a catalogue's duplicates show (re-encode, rescale, title strip, brightness, trim, tint:
      :data:`~bannermatch.evaluate.MILD_EDITS`), embedded with ``weights`` (the features' own); ``c`` is the
      median cosine of a copy to its original;
    - distinct banners: ``d`` is the median cosine of a banner to its nearest neighbour that identical pixels
      and the perceptual hash do not link to it (medians, so the collection's own duplicates barely move it).

    The threshold is their midpoint in distance, ``1 - sqrt((1 - c) (1 - d))``: as many times closer than a
    typical distinct neighbour as it is farther than a typical copy. Cached per feature set (with the copies).
    """
    import json

    from ..evaluate import MILD_EDITS, copy_features

    n = len(features.keys)
    if n < 2:
        raise BannermatchError("finding duplicates needs at least two banners")
    n_copies = max(1, min(max_copies, n // 10))
    settings = {"version": _CALIBRATION_VERSION, "features": features.content_id, "copies": n_copies,
                "hash_distance": hash_distance, "seed": seed}
    path = features.path / CALIBRATION_FILE
    try:
        cached = json.loads(path.read_text())
        if cached["settings"] == settings:
            return Calibration(**cached["calibration"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    measures = image_measures(features, progress)
    pixels, bits, by_hash, _ = _link_inputs(measures, features.keys)
    m = plain_matches(features, matches, min(10, n - 1), device)
    distinct = _nearest_distinct(m, pixels, bits, by_hash, hash_distance)
    copies, true_index, _ = copy_features(features, weights, device, n_copies, seed, MILD_EDITS, progress,
                                          one_edit_each=True)
    copy_cos = np.sum(copies * features.features[true_index], axis=1)
    c = float(np.median(copy_cos))
    d = float(np.median(distinct)) if len(distinct) else -1.0
    threshold = min(1.0, 1 - math.sqrt(max(0.0, 1 - c) * max(0.0, 1 - d)))
    rule = (f"midpoint in distance between edited copies (median cosine {c:.3f} over {len(copy_cos)}) and "
            f"each banner's nearest distinct neighbour (median {d:.3f} over {len(distinct)})")
    if c <= d:
        log.warning("these features hold edited copies no closer than distinct banners (median cosine %.3f vs "
                    "%.3f): the model links are unreliable; identical pixels and the hash still hold", c, d)
    calibration = Calibration(threshold, rule, c, d, float(np.mean(copy_cos >= threshold)), len(copy_cos))
    write_json(path, {"settings": settings, "calibration": asdict(calibration)})
    log.info("duplicate threshold %.3f: %s", threshold, rule)
    return calibration


# ------------------------------------------------------------------------------------------ groups

def _components(n: int, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Connected components (of two or more) of the graph on ``range(n)`` with the edges ``(i, j)``."""
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(a) for a in range(n)])
    order = np.argsort(roots, kind="stable")
    parts = np.split(order, np.flatnonzero(np.diff(roots[order])) + 1)
    return [p for p in parts if len(p) > 1]


def complete_linkage(strength: np.ndarray, threshold: float) -> list[list[int]]:
    """Clusters of ``range(m)`` in which every pair has ``strength`` >= ``threshold``: agglomerative complete
    linkage (the strongest pair of clusters merges first; two clusters are as strong as their weakest pair)."""
    m = len(strength)
    link = strength.astype(np.float64, copy=True)
    np.fill_diagonal(link, -np.inf)
    members = {i: [i] for i in range(m)}
    while len(members) > 1:
        flat = int(np.argmax(link))
        a, b = divmod(flat, m)
        if link[a, b] < threshold:
            break
        link[a] = np.minimum(link[a], link[b])
        link[:, a] = link[a]
        link[a, a] = -np.inf
        link[b] = link[:, b] = -np.inf
        members[a] += members.pop(b)
    return [sorted(c) for c in members.values() if len(c) > 1]


@dataclass
class DuplicateGroup:
    """Banners that are the same art: every member is linked to every other (pixels, hash or cosine)."""

    keys: list[str]
    scores: list[float]  # each member's highest cosine similarity to another member (1.0: identical pixels)
    pixels: list[str]  # each member's decoded-pixel digest ("" if unreadable): exact copies share one

    @property
    def exact(self) -> bool:
        """Every member has the same decoded pixels."""
        return bool(self.pixels[0]) and len(set(self.pixels)) == 1


@dataclass
class Duplicates:
    """Duplicate groups of a feature set, largest first."""

    features: FeatureSet
    threshold: float
    groups: list[DuplicateGroup]
    calibration: Calibration
    hash_distance: int = HASH_DISTANCE

    def __len__(self) -> int:
        return len(self.groups)

    def group_of(self, key: str) -> DuplicateGroup | None:
        if getattr(self, "_of", None) is None:
            self._of = {k: g for g in self.groups for k in g.keys}
        return self._of.get(key)

    def records(self) -> list[dict]:
        """One row per member: group number, exact, app id (key), name, score, pixel digest."""
        return [{"group": gi, "exact": g.exact, "key": key, "name": self.features.name(key), "score": round(score, 4),
                 "pixels": pixels}
                for gi, g in enumerate(self.groups) for key, score, pixels in zip(g.keys, g.scores, g.pixels)]

    def to_json(self, path: str | Path) -> Path:
        return write_json(path, {
            "threshold": self.threshold, "rule": self.calibration.rule, "calibration": asdict(self.calibration),
            "hash_distance": self.hash_distance, "banners": len(self.features.keys),
            "recipe": self.features.recipe.label,
            "groups": [{"group": gi, "exact": g.exact, "size": len(g.keys),
                        "members": [{"key": key, "name": self.features.name(key), "score": round(score, 4),
                                     "pixels": pixels} for key, score, pixels in zip(g.keys, g.scores, g.pixels)]}
                       for gi, g in enumerate(self.groups)]})

    def to_csv(self, path: str | Path) -> Path:
        return write_csv(path, self.records(), ["group", "exact", "key", "name", "score", "pixels"])

    def summary(self) -> str:
        exact = sum(g.exact for g in self.groups)
        banners = sum(len(g.keys) for g in self.groups)
        return (f"{len(self.groups)} duplicate groups ({exact} of identical pixels) holding {banners} of "
                f"{len(self.features.keys)} banners: identical pixels, perceptual hashes within {self.hash_distance} "
                f"bits, or cosine >= {self.threshold:.3f} ({self.calibration.rule})")

    def rows(self, max_groups: int | None = None) -> list[tuple[str, list[tuple[str, float | None]]]]:
        """Grid rows: a label and the members with their scores, for :func:`~bannermatch.display.show_grid`."""
        return [(f"group {gi + 1}{' (identical pixels)' if g.exact else ''}", list(zip(g.keys, g.scores)))
                for gi, g in enumerate(self.groups[:max_groups])]

    def show(self, max_groups: int = 10, ncols: int = 6, save: str | Path | None = None):
        """The largest groups as rows of banners (name, app id, best score to another member)."""
        return show_grid(self.features, self.rows(max_groups), ncols, save, empty="no duplicate groups")


def find_duplicates(
    features: FeatureSet,
    threshold: float | None = None,
    matches: Matches | None = None,
    weights: str | Path | None = None,
    device: str | None = None,
    hash_distance: int = HASH_DISTANCE,
    progress: bool = True,
) -> Duplicates:
    """Groups of duplicate banners (see the module): links by identical pixels, perceptual hashes within
    ``hash_distance`` bits, and cosine >= ``threshold`` (default: :func:`calibrate_threshold`, which embeds a
    tenth of the collection's size in edited copies once, with ``weights``); complete linkage inside each
    connected component. Groups are listed largest first, members in collection order."""
    if not isinstance(hash_distance, (int, np.integer)) or not 0 <= hash_distance <= 64:
        raise BannermatchError(f"a hash distance is a number of bits from 0 to 64, not {hash_distance!r}")
    calibration = (Calibration(check_threshold(threshold), "given") if threshold is not None else
                   calibrate_threshold(features, weights, device, matches, hash_distance, progress=progress))
    threshold, n = calibration.threshold, len(features.keys)
    measures = image_measures(features, progress)
    pixels, bits, by_hash, by_cosine = _link_inputs(measures, features.keys)
    hi, hj = hash_pairs(bits, by_hash, hash_distance)
    ci, cj, _ = near_pairs(features, threshold, matches, device)
    keep = by_cosine[ci] & by_cosine[cj]
    ci, cj = ci[keep], cj[keep]
    first: dict[str, int] = {}  # identical pixels: each banner linked to the first of its picture
    pi, pj = np.array([(i, first.setdefault(p, i)) for i, p in enumerate(pixels) if p], np.int64).reshape(-1, 2).T
    groups = []
    for component in _components(n, np.concatenate([pi, hi, ci]), np.concatenate([pj, hj, cj])):
        x = features.features[component]
        cos = x @ x.T
        same, close = _pixel_and_hash_links(pixels, bits, by_hash, component[:, None], component[None, :],
                                            hash_distance)
        embedded = by_cosine[component]
        # any link counts; identical pixels merge first, then hash links, then the most similar pairs
        strength = np.where(same, 3.0, np.where(close, 2.0, np.where(embedded[:, None] & embedded[None, :], cos,
                                                                     -np.inf)))
        # banners of identical pixels are one node (placeholders: hundreds of app ids, one picture)
        labels = [p or f"unreadable {i}" for i, p in enumerate(pixels[component])]
        _, first, node_of = np.unique(labels, return_index=True, return_inverse=True)
        clusters = complete_linkage(strength[np.ix_(first, first)], threshold)
        clustered = {v for c in clusters for v in c}
        clusters += [[v] for v in np.flatnonzero(np.bincount(node_of) > 1) if v not in clustered]
        for cluster in clusters:
            members = np.flatnonzero(np.isin(node_of, cluster))
            rows = component[members]
            best = np.where(same[np.ix_(members, members)], 1.0, cos[np.ix_(members, members)])
            np.fill_diagonal(best, -np.inf)
            groups.append(DuplicateGroup([features.keys[i] for i in rows], best.max(axis=1).astype(float).tolist(),
                                         [pixels[i] for i in rows]))
    groups.sort(key=lambda g: (-len(g.keys), -min(g.scores)))
    large = [g for g in groups if not g.exact and len(g.keys) > max(10, LARGE_GROUP * n)]
    for g in large:
        log.warning("a duplicate group holds %d of %d banners (%.1f%%): is the threshold %.3f too low?",
                    len(g.keys), n, 100 * len(g.keys) / n, threshold)
    return Duplicates(features, threshold, groups, calibration, hash_distance)
