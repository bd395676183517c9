"""Questions about a whole collection, beyond "what looks like X": which banners are duplicates, which are unlike
any other, which are broken or placeholders, and what the most-played games look like.

One verb each, like imagededup's: :func:`find_duplicates`, :func:`find_unique`, :func:`find_issues`,
:func:`most_played`. Each returns an object with ``records()`` (JSON-ready rows), ``to_json``, ``to_csv`` and
``show()`` (a grid); :mod:`bannermatch.gallery` writes each as an HTML page. :func:`exclusion` keeps a query's own
duplicates, or banners with issues, out of match lists (``find_matches``/``query``/``show_matches`` ``exclude=``).

Image measures (a digest of the decoded pixels, brightness, sharpness, entropy, colour, size) come from one
streaming pass over the stored images and are cached beside the features, keyed by each banner's byte digest,
so a re-run reads only banners that are new.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .display import iter_banners, show_grid
from .errors import BannermatchError
from .files import atomic_write
from .matches import Matches, find_matches
from .sources import SkipImage, decode_image
from .steam import STEAM_API, STEAM_CDN, banner_url, http_get_json
from .store import FeatureSet

log = logging.getLogger(__name__)

STATS_FILE = "image_stats.json"
_STATS_VERSION = 1  # bump when a measure changes, so cached measures are recomputed
_ANALYSIS_SIDE = 256  # px: images are measured with their short side at most this, so sizes compare
_ROWS = 512  # query rows per similarity block (bounded memory: 512 x N floats)


def _write_json(path: str | Path, data) -> Path:
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")))
    return path


def _write_csv(path: str | Path, rows: list[dict], columns: Sequence[str]) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------ image measures

def measure_image(img: Image.Image) -> dict:
    """The measures of one decoded RGB banner that the issue detectors and exact duplicates read.

    ``pixels``: sha256 (16 hex) of the size and decoded RGB pixels (the same picture saved twice has one, a
    re-encoded one does not); ``bright99``/``bright5``: the 99th/5th percentile of luminance (0-1);
    ``laplacian``: variance of the 4-neighbour Laplacian of the luminance stretched to the full 0-255 range
    (so dark or faded banners are not called blurry for their low contrast); ``entropy``: bits of the 256-level
    grey histogram; ``chroma``: 99th percentile of max-min over the RGB channels (0-255); ``width``/``height``.
    Everything but ``pixels`` is measured with the short side at most 256 px.
    """
    w, h = img.size
    pixels = hashlib.sha256(f"{w}x{h}\0".encode() + img.tobytes()).hexdigest()[:16]
    scale = min(1.0, _ANALYSIS_SIDE / min(w, h))
    small = img if scale == 1.0 else img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    rgb = np.asarray(small, dtype=np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    p1, p5, p99 = np.percentile(grey, [1, 5, 99])
    stretched = (grey - p1) * (255.0 / max(float(p99 - p1), 1.0))
    if min(grey.shape) >= 3:
        lap = (stretched[:-2, 1:-1] + stretched[2:, 1:-1] + stretched[1:-1, :-2] + stretched[1:-1, 2:]
               - 4 * stretched[1:-1, 1:-1])
        laplacian = float(lap.var())
    else:
        laplacian = 0.0
    hist = np.bincount(np.clip(np.rint(grey), 0, 255).astype(np.int64).ravel(), minlength=256) / grey.size
    hist = hist[hist > 0]
    return {"pixels": pixels, "width": w, "height": h, "bright99": float(p99) / 255, "bright5": float(p5) / 255,
            "laplacian": laplacian, "entropy": float(-(hist * np.log2(hist)).sum()),
            "chroma": float(np.percentile(rgb.max(-1) - rgb.min(-1), 99))}


def image_measures(features: FeatureSet, progress: bool = True) -> dict[str, dict]:
    """``{key: measure_image(banner)}`` for the collection, from ``image_stats.json`` beside the features; banners
    whose bytes are not measured yet are read once, in one streaming pass. Unreadable banners are left out."""
    from tqdm.auto import tqdm

    path = features.path / STATS_FILE
    try:
        cached = json.loads(path.read_text())
        measures = cached["measures"] if cached.get("version") == _STATS_VERSION else {}
    except FileNotFoundError:
        measures = {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s is damaged; measuring the banners again", path)
        measures = {}
    first_key: dict[str, str] = {}  # new digest -> its first key: the same bytes are measured once
    for key, digest in zip(features.keys, features.digests):
        if digest not in measures:
            first_key.setdefault(digest, key)
    todo = {key: digest for digest, key in first_key.items()}
    if todo:
        for key, img in tqdm(iter_banners(features, todo), total=len(todo), desc="measuring banners", unit="img",
                             disable=not progress):
            measures[todo[key]] = measure_image(img)
        if not any(todo[key] in measures for key in todo):
            raise BannermatchError(f"the banners of {features.path} cannot be read from {features.images!r}; "
                                   "was the folder moved?")
        current = set(features.digests)
        _write_json(path, {"version": _STATS_VERSION,
                           "measures": {d: m for d, m in measures.items() if d in current}})
    return {key: measures[d] for key, d in zip(features.keys, features.digests) if d in measures}


# ------------------------------------------------------------------------------------------ union-find

def _components(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of two or more) of the graph on ``range(n)`` with the edges ``pairs``."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


# ------------------------------------------------------------------------------------------ duplicates

#: The copy-detection edits a re-upload of the same art goes through (re-encoding, rescaling blur, a tint, a new
#: logo or caption); crops, flips and 16:9 frames are left out: they make look-alikes, not duplicates.
DUPLICATE_EDITS = ("jpeg", "blur", "colour", "overlay")
THRESHOLD_FILE = "duplicate_threshold.json"


def duplicate_threshold(
    features: FeatureSet,
    weights: str | Path | None = None,
    device: str | None = None,
    n_queries: int = 200,
    percentile: float = 5.0,
    edits: Sequence[str] = DUPLICATE_EDITS,
    seed: int = 0,
    progress: bool = True,
) -> float:
    """The cosine similarity edited copies keep: the ``percentile``-th percentile of copy -> original similarity
    over ``n_queries`` sampled banners, each edited with every one of ``edits`` (copy detection's edits, see
    :mod:`bannermatch.evaluate`), on these very features. Pairs above it are as alike as a banner and its edited
    copy. The copies are embedded once (with ``weights``, the features' own) and the result is cached."""
    from .evaluate import _check_transforms, _copy_features

    edits = _check_transforms(edits)
    n_queries = min(n_queries, len(features.keys))  # a larger sample is the whole collection, the same copies
    settings = {"features": features.content_id, "n_queries": n_queries, "percentile": percentile,
                "edits": list(edits), "seed": seed}
    path = features.path / THRESHOLD_FILE
    try:
        cached = json.loads(path.read_text())
        if cached["settings"] == settings:
            return float(cached["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    copies, true_index, _ = _copy_features(features, weights, device, n_queries, seed, edits, progress)
    similarity = np.sum(copies * features.features[true_index], axis=1)
    threshold = float(np.percentile(similarity, percentile))
    _write_json(path, {"settings": settings, "threshold": threshold, "copies": len(similarity)})
    log.info("duplicate threshold %.3f: the %g-th percentile of %d edited copies' similarity to their original",
             threshold, percentile, len(similarity))
    return threshold


def _plain_matches(features: FeatureSet, matches: Matches | None, k: int, device: str | None) -> Matches:
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
    m = _plain_matches(features, matches, min(10, n - 1), device)
    hit = m.scores >= threshold
    rows, cols, scores = [np.nonzero(hit)[0]], [m.neighbours[hit]], [m.scores[hit]]
    full = np.flatnonzero(hit[:, -1]) if m.k < n - 1 else np.zeros(0, np.int64)
    x = torch.from_numpy(np.ascontiguousarray(features.features, np.float32))
    for start in range(0, len(full), _ROWS):
        r = full[start:start + _ROWS]
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


@dataclass
class DuplicateGroup:
    """Banners that are the same art: joined by identical decoded pixels or by cosine >= the threshold."""

    keys: list[str]
    scores: list[float]  # each member's highest cosine similarity to another member
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
        return _write_json(path, {
            "threshold": self.threshold, "banners": len(self.features.keys), "recipe": self.features.recipe.label,
            "groups": [{"group": gi, "exact": g.exact, "size": len(g.keys),
                        "members": [{"key": key, "name": self.features.name(key), "score": round(score, 4),
                                     "pixels": pixels} for key, score, pixels in zip(g.keys, g.scores, g.pixels)]}
                       for gi, g in enumerate(self.groups)]})

    def to_csv(self, path: str | Path) -> Path:
        return _write_csv(path, self.records(), ["group", "exact", "key", "name", "score", "pixels"])

    def summary(self) -> str:
        exact = sum(g.exact for g in self.groups)
        banners = sum(len(g.keys) for g in self.groups)
        return (f"{len(self.groups)} duplicate groups ({exact} of identical pixels) holding {banners} of "
                f"{len(self.features.keys)} banners, at cosine >= {self.threshold:.3f}")

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
    progress: bool = True,
) -> Duplicates:
    """Groups of duplicate banners: connected components (union-find) of two kinds of link, identical decoded
    pixels and cosine similarity >= ``threshold`` (default: :func:`duplicate_threshold`, which embeds edited
    copies once with ``weights``). Groups are listed largest first, members in collection order."""
    if threshold is None:
        threshold = duplicate_threshold(features, weights, device, progress=progress)
    if not -1.0 <= threshold <= 1.0:
        raise BannermatchError(f"a cosine threshold is between -1 and 1, not {threshold}")
    measures = image_measures(features, progress)
    pixels = [measures.get(key, {}).get("pixels", "") for key in features.keys]
    first: dict[str, int] = {}
    exact = [(i, first.setdefault(p, i)) for i, p in enumerate(pixels) if p]
    lo, hi, _ = near_pairs(features, threshold, matches, device)
    copies = Counter(p for p in pixels if p)
    groups = []
    for members in _components(len(features.keys), [*exact, *zip(lo.tolist(), hi.tolist())]):
        x = torch.from_numpy(features.features[members])
        sims = x @ x.T
        sims.fill_diagonal_(-torch.inf)
        best = sims.max(dim=1).values.tolist()
        same = [copies[pixels[i]] > 1 for i in members]
        groups.append(DuplicateGroup([features.keys[i] for i in members],
                                     [1.0 if s else float(b) for s, b in zip(same, best)],
                                     [pixels[i] for i in members]))
    groups.sort(key=lambda g: (-len(g.keys), -min(g.scores)))
    return Duplicates(features, float(threshold), groups)


# ------------------------------------------------------------------------------------------ unique banners

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
        return _write_json(path, {"threshold": self.threshold, "n": self.n, "banners": len(self.keys),
                                  "recipe": self.features.recipe.label, "unique": self.records()})

    def to_csv(self, path: str | Path) -> Path:
        return _write_csv(path, self.records(), ["rank", "key", "name", "score", "neighbour", "neighbour_name"])

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
    m = _plain_matches(features, matches, 1, device)
    order = np.argsort(m.scores[:, 0], kind="stable")
    return UniqueBanners(features, [features.keys[i] for i in order],
                         [features.keys[j] for j in m.neighbours[order, 0]], m.scores[order, 0].astype(np.float32), n)


# ------------------------------------------------------------------------------------------ banner issues

#: Each detector's threshold, on the measures of :func:`measure_image` (chosen on synthetic banners and the
#: scikit-image photos, where a clean image was never flagged and each edited one was):
ISSUE_THRESHOLDS = {
    "dark": 0.2,  # bright99 below: hardly a pixel brighter than 20% grey
    "light": 0.8,  # bright5 above: hardly a pixel darker than 80% grey
    "blurry": 25.0,  # laplacian below (sharp banners and photos: 100-800; a 2 px Gaussian blur: 3-33)
    "low_information": 1.5,  # entropy below, bits: mostly one or two flat tones (banners: 2.2-3, photos: 4-8)
    "grayscale": 8.0,  # chroma at most: no coloured pixel beyond JPEG noise
    "odd_size": 200,  # short side below, px (Steam serves 600x900 and 300x450; downloads keep 256x384)
    "odd_aspect": 0.1,  # height/width further than 10% from Steam's 2:3
    "placeholder": 5,  # one picture (identical pixels) under at least this many app ids
}
ISSUES = tuple(ISSUE_THRESHOLDS)


def _severity(issue: str, m: dict, t: float) -> float | None:
    """How far past its threshold a banner is for one issue (None: it does not have it); larger is worse."""
    aspect = m["height"] / m["width"] / 1.5 - 1
    value = {"dark": t - m["bright99"], "light": m["bright5"] - t, "blurry": t - m["laplacian"],
             "low_information": t - m["entropy"], "grayscale": t - m["chroma"] + 1e-9,
             "odd_size": t - min(m["width"], m["height"]), "odd_aspect": abs(aspect) - t}[issue]
    return value if value > 0 else None


@dataclass
class Issues:
    """Banners with issues: ``flagged[issue]`` lists them, the worst first."""

    features: FeatureSet
    measures: dict[str, dict]
    flagged: dict[str, list[str]]
    thresholds: dict[str, float]

    def counts(self) -> dict[str, int]:
        return {issue: len(keys) for issue, keys in self.flagged.items()}

    def keys_with(self, *issues: str) -> set[str]:
        """Banners with any of ``issues`` (every issue if none is named)."""
        _check_issues(issues)
        return {key for issue in (issues or ISSUES) for key in self.flagged[issue]}

    def of(self, key: str) -> list[str]:
        return [issue for issue, keys in self.flagged.items() if key in keys]

    def records(self) -> list[dict]:
        """One row per (issue, banner): issue, app id (key), name, and the banner's measures."""
        return [{"issue": issue, "key": key, "name": self.features.name(key),
                 **{m: v for m, v in self.measures.get(key, {}).items()}}
                for issue, keys in self.flagged.items() for key in keys]

    def to_json(self, path: str | Path) -> Path:
        return _write_json(path, {"banners": len(self.features.keys), "thresholds": self.thresholds,
                                  "counts": self.counts(),
                                  "issues": {issue: [{"key": key, "name": self.features.name(key)} for key in keys]
                                             for issue, keys in self.flagged.items()}})

    def to_csv(self, path: str | Path) -> Path:
        columns = ["issue", "key", "name", "width", "height", "bright99", "bright5", "laplacian", "entropy", "chroma",
                   "pixels"]
        return _write_csv(path, self.records(), columns)

    def summary(self) -> str:
        counts = ", ".join(f"{issue} {n}" for issue, n in self.counts().items())
        return f"{len(self.keys_with())} of {len(self.features.keys)} banners have issues: {counts}"

    def rows(self, per_issue: int = 12) -> list[tuple[str, list[tuple[str, float | None]]]]:
        return [(f"{issue} ({len(keys)})", [(key, None) for key in keys[:per_issue]])
                for issue, keys in self.flagged.items() if keys]

    def show(self, per_issue: int = 6, save: str | Path | None = None):
        """The worst examples of each issue found, one row per issue (a grid's columns: ``per_issue``)."""
        return show_grid(self.features, self.rows(per_issue), per_issue, save, empty="no issues found")


def _check_issues(issues: Iterable[str]) -> None:
    unknown = [i for i in issues if i not in ISSUES]
    if unknown:
        raise BannermatchError(f"unknown issue {', '.join(unknown)}; choose from: {', '.join(ISSUES)}")


def find_issues(features: FeatureSet, thresholds: dict[str, float] | None = None, progress: bool = True) -> Issues:
    """Dark, light, blurry, low-information, grayscale, odd-size and odd-aspect banners, and Steam's placeholders
    (one picture under many app ids), from :func:`image_measures` (cached) and ``ISSUE_THRESHOLDS`` (override any
    with ``thresholds``)."""
    _check_issues(thresholds or {})
    thresholds = {**ISSUE_THRESHOLDS, **(thresholds or {})}
    measures = image_measures(features, progress)
    flagged: dict[str, list[str]] = {}
    for issue in ISSUES[:-1]:
        found = [(s, key) for key, m in measures.items() if (s := _severity(issue, m, thresholds[issue])) is not None]
        flagged[issue] = [key for _, key in sorted(found, key=lambda f: -f[0])]
    by_picture: dict[str, list[str]] = {}
    for key, m in measures.items():
        by_picture.setdefault(m["pixels"], []).append(key)
    shared = sorted((keys for keys in by_picture.values() if len(keys) >= thresholds["placeholder"]), key=len, reverse=True)
    flagged["placeholder"] = [key for keys in shared for key in keys]
    return Issues(features, measures, flagged, thresholds)


# ------------------------------------------------------------------------------------------ exclusions

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
        from .recipe import resolve_device

        dev = resolve_device(device)
        db = torch.from_numpy(np.ascontiguousarray(self.features.features, np.float32)).to(dev)
        banned = torch.from_numpy(self.banned).to(dev)
        group = torch.from_numpy(self.group).to(dev)
        out_idx = np.empty((len(queries), k), np.int64)
        out_val = np.empty((len(queries), k), np.float32)
        for start in range(0, len(queries), _ROWS):
            q = torch.as_tensor(np.asarray(queries[start:start + _ROWS], np.float32)).to(dev)
            sims = q @ db.T
            sims[:, banned] = -torch.inf
            if rows is not None:
                own = torch.from_numpy(np.asarray(rows[start:start + _ROWS])).to(dev)
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


# ------------------------------------------------------------------------------------------ most played

STEAMSPY_API = "https://steamspy.com/api.php"
CHARTS = ("steam", "steamspy")


def most_played_apps(chart: str = "steam", n: int = 100, api: str | None = None, steamspy: str = STEAMSPY_API,
                     timeout: float = 10) -> list[tuple[str, str]]:
    """``(appid, name)`` of the currently most-played games, most played first: Steam's
    ``ISteamChartsService/GetMostPlayedGames`` (no names: ``""``) or SteamSpy's ``top100in2weeks``."""
    if chart not in CHARTS:
        raise BannermatchError(f"unknown chart {chart!r}; choose one of: {', '.join(CHARTS)}, or give app ids")
    try:
        if chart == "steam":
            url = f"{(api or STEAM_API).rstrip('/')}/ISteamChartsService/GetMostPlayedGames/v1/"
            ranks = http_get_json(url, timeout)["response"]["ranks"]
            apps = [(str(int(r["appid"])), "") for r in sorted(ranks, key=lambda r: int(r["rank"]))]
        else:
            url = f"{steamspy}?request=top100in2weeks"
            apps = [(str(int(a["appid"])), str(a.get("name", ""))) for a in http_get_json(url, timeout).values()]
    except urllib.error.HTTPError as exc:
        raise BannermatchError(f"{url} failed: HTTP {exc.code}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BannermatchError(f"{url} did not return a chart of games") from None
    return apps[:n]


@dataclass
class PlayedGame:
    """One game of the chart and its look-alikes in the collection."""

    rank: int
    appid: str
    name: str
    status: str  # "in collection", "fetched" (from the CDN, embedded now) or "unavailable: <why>"
    matches: list[tuple[str, float]] = field(default_factory=list)
    image: Image.Image | None = None  # the fetched banner of a game missing from the collection


@dataclass
class MostPlayed:
    """The look-alikes of each game of a chart (or of a given list of app ids)."""

    features: FeatureSet
    games: list[PlayedGame]
    k: int
    chart: str

    @property
    def fetched(self) -> list[PlayedGame]:
        """Games missing from the collection whose banners were fetched from the CDN and embedded."""
        return [g for g in self.games if g.status == "fetched"]

    @property
    def unavailable(self) -> list[PlayedGame]:
        return [g for g in self.games if g.status.startswith("unavailable")]

    def records(self) -> list[dict]:
        return [{"rank": g.rank, "appid": g.appid, "name": g.name, "status": g.status,
                 "matches": [{"key": key, "name": self.features.name(key), "score": round(score, 4)}
                             for key, score in g.matches]} for g in self.games]

    def to_json(self, path: str | Path) -> Path:
        return _write_json(path, {"chart": self.chart, "k": self.k, "recipe": self.features.recipe.label,
                                  "fetched": [g.appid for g in self.fetched],
                                  "unavailable": [g.appid for g in self.unavailable], "games": self.records()})

    def to_csv(self, path: str | Path) -> Path:
        rows = [{"rank": g.rank, "appid": g.appid, "name": g.name, "status": g.status, "match_rank": r + 1,
                 "key": key, "match_name": self.features.name(key), "score": round(score, 4)}
                for g in self.games for r, (key, score) in enumerate(g.matches)]
        return _write_csv(path, rows, ["rank", "appid", "name", "status", "match_rank", "key", "match_name", "score"])

    def summary(self) -> str:
        lines = [f"{len(self.games)} games of {self.chart}: {len(self.games) - len(self.fetched) - len(self.unavailable)} "
                 f"in the collection, {len(self.fetched)} fetched from the CDN, {len(self.unavailable)} unavailable"]
        lines += [f"  fetched: {g.name or g.appid} ({g.appid})" for g in self.fetched]
        lines += [f"  {g.status}: {g.name or g.appid} ({g.appid})" for g in self.unavailable]
        return "\n".join(lines)

    def rows(self, max_games: int | None = None) -> list[tuple[str, list[tuple[str | Image.Image, float | None]]]]:
        """Grid rows: each game (its fetched banner if it is not in the collection), then its matches."""
        return [(f"#{g.rank} {g.name or g.appid} ({g.appid})" + (", fetched from the CDN" if g.status == "fetched" else ""),
                 [(g.image if g.image is not None else g.appid, None), *g.matches])
                for g in [g for g in self.games if not g.status.startswith("unavailable")][:max_games]]

    def show(self, max_games: int = 10, save: str | Path | None = None):
        """Each game's top-k, one row per game, the game itself first."""
        return show_grid(self.features, self.rows(max_games), self.k + 1, save, empty="no games")


def _fetch_banner(appid: str, host: str, timeout: float) -> Image.Image | str:
    """A game's vertical banner from the CDN, or why it could not be had."""
    request = urllib.request.Request(banner_url(appid, host), headers={"User-Agent": "bannermatch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return decode_image(response.read())
    except urllib.error.HTTPError as exc:
        return "no vertical banner on the CDN" if exc.code == 404 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"cannot reach the CDN ({getattr(exc, 'reason', exc)})"
    except SkipImage as exc:
        return f"not usable ({exc})"


def most_played(
    features: FeatureSet,
    games: str | Sequence[str | int] = "steam",
    k: int = 10,
    n: int = 100,
    host: str = STEAM_CDN,
    api: str | None = None,
    steamspy: str = STEAMSPY_API,
    weights: str | Path | None = None,
    device: str | None = None,
    exclude: Exclusion | None = None,
    names: dict[str, str] | None = None,
    timeout: float = 10,
) -> MostPlayed:
    """The top-k look-alikes of the ``n`` most-played games (``games="steam"``: Steam's chart; ``"steamspy"``:
    SteamSpy's top 100 in two weeks; or a list of app ids). A game missing from the collection has its banner
    fetched from the CDN at ``host`` and embedded with the features' own recipe (``weights``: the features'
    local weights); games without a banner are listed as unavailable. ``names`` ({appid: name}, e.g. Steam's app
    list) names games the collection does not hold."""
    from .query import query

    if isinstance(games, str):
        apps, chart = most_played_apps(games, n, api, steamspy, timeout), games
    else:
        apps, chart = [(str(a).strip(), "") for a in games][:n], "given app ids"
        if bad := [a for a, _ in apps if not a.isdigit()]:
            raise BannermatchError(f"app ids must be integers, got {', '.join(map(repr, bad[:5]))}")
    index = features.index_map()
    names = names or {}
    played = [PlayedGame(r + 1, appid, features.name(appid) or names.get(appid) or name,
                         "in collection" if appid in index else "")
              for r, (appid, name) in enumerate(apps)]
    for game in played:
        if not game.status:
            fetched = _fetch_banner(game.appid, host, timeout)
            game.status, game.image = ("fetched", fetched) if isinstance(fetched, Image.Image) else (
                f"unavailable: {fetched}", None)
            if game.image is None:
                log.warning("%s (%s): %s", game.name or "app", game.appid, fetched)
    asked = [g for g in played if not g.status.startswith("unavailable")]
    queries = [g.appid if g.image is None else g.image for g in asked]
    if queries:
        for game, result in zip(asked, query(features, queries, k=k, weights=weights, device=device, exclude=exclude)):
            game.matches = result.matches
    return MostPlayed(features, played, k, chart)
