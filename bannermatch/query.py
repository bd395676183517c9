"""Queries: app ids, game names, image files, URLs or PIL images -> their top-k matches in a feature set."""

from __future__ import annotations

import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BannermatchError
from .extraction import embed_images, load_backbone
from .matches import Matches
from .search import top_k
from .sources import SkipImage, decode_image, prepare_image
from .steam import search_names
from .store import FeatureSet

log = logging.getLogger(__name__)


@dataclass
class QueryResult:
    """A query (a stored banner, or a new image) and its top-k matches."""

    key: str | None  # None for a new image
    name: str
    image: object  # PIL image of a new query, else None (read from the collection when shown)
    matches: list[tuple[str, float]]

    @property
    def keys(self) -> list[str]:
        """The stored banners this result shows: the query's own (unless it is a new image), then its matches'."""
        return [key for key in [self.key, *(m for m, _ in self.matches)] if key]


def resolve_key(features: FeatureSet, q: str, names: dict[str, str] | None = None) -> str:
    """A stored key from an app id or a game name (case-insensitive search)."""
    q = str(q).strip()
    if q in features.index_map():
        return q
    if names is None:
        hits = features.name_index().search(q, limit=5)
    else:
        hits = search_names({k: v for k, v in names.items() if k in features.index_map()}, q, limit=5)
    if not hits:
        if q.isdigit():
            raise BannermatchError(f"app id {q} is not in this feature set ({features.size})")
        raise BannermatchError(f"no game in this feature set has a name matching {q!r}")
    if len(hits) > 1:
        log.info("%r matches %s; using %s", q, ", ".join(f"{n} ({a})" for a, n in hits), hits[0][1])
    return hits[0][0]


def _open_query_image(q):
    from PIL import Image

    if isinstance(q, Image.Image):
        try:
            return prepare_image(q)
        except SkipImage as exc:
            raise BannermatchError(f"query image is not usable: {exc}") from None
    q = str(q)
    try:
        if q.startswith(("http://", "https://")):
            with urllib.request.urlopen(q, timeout=30) as resp:
                data = resp.read()
        else:
            data = Path(q).read_bytes()
        return decode_image(data)
    except SkipImage as exc:
        raise BannermatchError(f"query {q} is not usable: {exc}") from None
    except OSError as exc:
        raise BannermatchError(f"cannot read query image {q}: {exc}") from None


def _is_image_query(q) -> bool:
    from PIL import Image

    if isinstance(q, Image.Image):
        return True
    q = str(q)
    return q.startswith(("http://", "https://")) or (os.path.sep in q or "." in q) and Path(q).is_file()


def query(
    features: FeatureSet,
    queries,
    k: int = 10,
    names: dict[str, str] | None = None,
    matches: Matches | None = None,
    backbone=None,
    weights: str | Path | None = None,
    device: str | None = None,
    exclude=None,
) -> list[QueryResult]:
    """Top-k matches for app ids, game names, image files, URLs or PIL images (one or a list).

    New images are embedded with the feature set's own recipe, so query and collection always agree.
    ``exclude``: a :class:`~bannermatch.reports.Exclusion`, banners kept out of the results (a stored query's own
    duplicates, banners with issues).
    """
    if isinstance(queries, (str, int)) or not isinstance(queries, (list, tuple)):
        queries = [queries]
    names = names or features.names
    results: list[QueryResult | None] = [None] * len(queries)
    keys_at, images_at = [], []
    for i, q in enumerate(queries):
        (images_at if _is_image_query(q) else keys_at).append(i)
    if keys_at:
        keys = [resolve_key(features, str(queries[i]), names) for i in keys_at]
        rows = np.array([features.index_of(key) for key in keys])
        if exclude is not None:
            idx, scores = exclude.top_k(features.features[rows], k, rows, device)
        elif matches is not None and matches.k >= k:
            idx, scores = matches.neighbours[rows, :k], matches.scores[rows, :k]
        else:
            idx, scores = top_k(features.features[rows], features.features, k, rows, device)
        for i, key, ix, sc in zip(keys_at, keys, idx, scores):
            results[i] = QueryResult(key, names.get(key, ""), None,
                                     [(features.keys[j], float(s)) for j, s in zip(ix, sc)])
    if images_at:
        imgs = [_open_query_image(queries[i]) for i in images_at]
        backbone = backbone or load_backbone(features.recipe, weights, device, "auto")
        if getattr(backbone, "spec", None) is None or backbone.spec.name != features.recipe.model:
            raise BannermatchError(f"queries must be embedded with {features.recipe.model}, the feature set's model")
        feats = embed_images(imgs, features.recipe, backbone)
        if exclude is not None:
            idx, scores = exclude.top_k(feats, k, None, device)
        else:
            idx, scores = top_k(feats, features.features, k, None, device)
        for i, img, ix, sc in zip(images_at, imgs, idx, scores):
            label = queries[i] if isinstance(queries[i], str) else "query image"
            results[i] = QueryResult(None, str(label), img, [(features.keys[j], float(s)) for j, s in zip(ix, sc)])
    return results
