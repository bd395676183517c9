"""Display: a query banner beside its top-k matches, with game name, app id and score in each title."""

from __future__ import annotations

import functools
import logging
import math
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from .errors import BannermatchError
from .matches import Matches
from .query import QueryResult, query
from .store import FeatureSet
from .sources import ImageSource, SkipImage, decode_image, open_source


log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _source(images: str, modified: int) -> tuple[ImageSource, dict[str, int]]:
    """The listed collection, kept between calls until its folder or archive changes (``modified``)."""
    source = open_source(images)
    return source, {e.key: i for i, e in enumerate(source.entries)}


def iter_banners(features: FeatureSet, keys: Iterable[str]) -> Iterator[tuple[str, Image.Image]]:
    """``(key, banner)`` for ``keys``, decoded one at a time from the collection the features were made from.

    Banners that cannot be read are logged and left out; memory stays bounded whatever the number of keys.
    """
    images = Path(features.images) if features.images else None
    if images is None or not images.exists():
        log.warning("the banners of %s are not at %r any more; showing placeholders", features.path, features.images)
        return
    source, index = _source(str(images), images.stat().st_mtime_ns)
    wanted = {index[k] for k in keys if k in index}
    for _, entry, data in source.read(wanted.__contains__):
        try:
            yield entry.key, decode_image(data)
        except SkipImage as exc:
            log.warning("cannot show %s: %s", entry.key, exc)


def banner_images(features: FeatureSet, keys: list[str]) -> dict[str, Image.Image | None]:
    """The banners of ``keys`` (None where unreadable)."""
    out: dict[str, Image.Image | None] = {k: None for k in keys}
    out.update(iter_banners(features, keys))
    return out


def _title(name: str, key: str | None, score: float | None) -> str:
    lines = textwrap.wrap(name, 22, max_lines=2, placeholder="…") if name else []
    meta = " · ".join(x for x in (key, f"{score:.3f}" if score is not None else None) if x)
    return "\n".join([*lines, meta])


def show_matches(
    features: FeatureSet,
    queries,
    k: int = 10,
    ncols: int = 5,
    matches: Matches | None = None,
    save: str | Path | None = None,
    results: list[QueryResult] | None = None,
    **query_options,
):
    """Draw each query banner and its top-k (default 10, two rows of five); returns the figure.

    ``queries`` are app ids, game names, image paths/URLs or PIL images (one or a list). Inline in a
    notebook; with ``save`` the figure is written as a PNG instead.
    """
    import matplotlib.pyplot as plt

    results = results or query(features, queries, k=k, matches=matches, **query_options)
    rows_per_query = math.ceil(k / ncols)
    keys = [key for r in results for key in [r.key, *(m for m, _ in r.matches[:k])] if key]
    images = banner_images(features, keys)
    fig, axes = plt.subplots(rows_per_query * len(results), ncols + 1,
                             figsize=(1.9 * (ncols + 1), 3.4 * rows_per_query * len(results)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for qi, result in enumerate(results):
        top = qi * rows_per_query
        qimg = result.image if result.image is not None else images.get(result.key)
        _draw(axes[top, 0], qimg, "QUERY\n" + _title(result.name, result.key, None))
        for j, (key, score) in enumerate(result.matches[:k]):
            _draw(axes[top + j // ncols, 1 + j % ncols], images.get(key), _title(features.name(key), key, score))
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=100)
        plt.close(fig)
    return fig


def _draw(ax, img, title: str) -> None:
    if img is not None:
        ax.imshow(img)
    else:
        ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=8, color="grey")
    ax.set_title(title, fontsize=7)


def compare_grid(
    feature_sets: list[FeatureSet],
    query_of,
    k: int = 10,
    save: str | Path | None = None,
    **query_options,
):
    """One query's top-k under several feature sets, one row each (labelled with its recipe); returns the figure.

    ``query_of`` is one app id, game name, image path/URL or PIL image; a new image is embedded with each
    set's own recipe (pass ``weights=``/``device=`` as for :func:`query`).
    """
    import matplotlib.pyplot as plt

    if not feature_sets:
        raise BannermatchError("compare_grid needs at least one feature set")
    rows = [(fs, query(fs, query_of, k=k, **query_options)[0]) for fs in feature_sets]
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.6 * (k + 1), 3.0 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for (fs, result), row in zip(rows, axes):
        images = banner_images(fs, result.keys)
        qimg = result.image if result.image is not None else images.get(result.key)
        _draw(row[0], qimg, f"{fs.recipe.label}\n" + _title(result.name, result.key, None))
        for ax, (key, score) in zip(row[1:], result.matches):
            _draw(ax, images.get(key), _title(fs.name(key), key, score))
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=100)
        plt.close(fig)
    return fig


def show_grid(
    features: FeatureSet,
    rows: list[tuple[str, list[tuple[str | Image.Image, float | None]]]],
    ncols: int = 6,
    save: str | Path | None = None,
    empty: str = "nothing to show",
):
    """Rows of banners, each row labelled (a duplicate group, an issue, a game and its look-alikes): items are
    stored keys (drawn with name, app id and score) or PIL images (new banners); a row longer than ``ncols``
    is cut. Returns the figure (saved as a PNG with ``save``)."""
    import matplotlib.pyplot as plt

    keys = [item for _, items in rows for item, _ in items[:ncols] if isinstance(item, str)]
    images = banner_images(features, keys)
    fig = plt.figure(figsize=(1.9 * ncols, 3.7 * max(1, len(rows))), layout="constrained")
    if not rows:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0, 0.5, empty, fontsize=12, va="center")
    for sub, (label, items) in zip(fig.subfigures(max(1, len(rows)), 1, squeeze=False)[:, 0], rows):
        sub.suptitle(label, x=0.01, ha="left", fontsize=9, fontweight="bold")
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        for ax in axes:
            ax.axis("off")
        for ax, (item, score) in zip(axes, items):
            if isinstance(item, str):
                _draw(ax, images.get(item), _title(features.name(item), item, score))
            else:
                _draw(ax, item, _title("", None, score))
    if save is not None:
        fig.savefig(save, dpi=100)
        plt.close(fig)
    return fig
