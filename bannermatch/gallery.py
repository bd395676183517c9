"""HTML gallery: one self-contained folder to browse the matches, with no server and no scripts.

``index.html`` lists the queries; each query has its own page with its banner and its top-k matches
(game name, app id, cosine score). Images are lazy-loaded, either from JPEG thumbnails written into
the folder (``images="local"``, works offline) or straight from the Steam CDN (``images="cdn"``, a tiny
folder). Every string from the data (game names, keys, URLs) is HTML-escaped, attributes included.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from .display import iter_banners
from .errors import BannermatchError
from .matches import Matches, find_matches
from .query import QueryResult, query
from .store import FeatureSet
from .steam import STEAM_CDN, banner_url

IMAGE_MODES = ("local", "cdn")
THUMB_WIDTH = 150  # px; banners are 2:3
STORE_PAGE = "https://store.steampowered.com/app/{}/"

#: Layout of banner grids, shared by the gallery pages and the explorer widget (classes prefixed to avoid clashes).
GRID_STYLE = """
.bm-grid { display: flex; flex-wrap: wrap; gap: 12px; }
.bm-grid figure { margin: 0; width: 150px; }
.bm-grid figure img, .bm-missing { width: 150px; height: 225px; object-fit: cover; display: block; }
.bm-missing { display: flex; align-items: center; justify-content: center; background: #8884; font-size: 0.8em; }
.bm-grid figcaption { font-size: 0.75em; overflow-wrap: anywhere; line-height: 1.3; }
.bm-key, .bm-score { opacity: 0.7; }
.bm-query { flex-wrap: nowrap; gap: 24px; align-items: flex-start; margin-bottom: 1.5em; }
.bm-query > .bm-grid { flex: 1; }
"""
_PAGE_STYLE = GRID_STYLE + """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #1b2838; color: #c7d5e0; }
a { color: #66c0f4; }
h1 { font-size: 1.4em; }
"""


def _e(value) -> str:
    """Escape for text and for quoted attribute values alike."""
    return html.escape(str(value), quote=True)


def store_page(key: str | None) -> str | None:
    """The Steam store page of a stored banner whose key is an app id (None for other keys and new images)."""
    return STORE_PAGE.format(key) if key and key.isdigit() else None


def thumbnail_jpeg(image: Image.Image, width: int = THUMB_WIDTH, quality: int = 85) -> bytes:
    """A small JPEG of a banner, ``width`` px wide with its own aspect ratio."""
    height = max(1, round(image.height * width / image.width))
    out = io.BytesIO()
    image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS).save(out, "JPEG", quality=quality)
    return out.getvalue()


def thumbnail_data_uri(image: Image.Image, width: int = THUMB_WIDTH) -> str:
    """A thumbnail inlined as a data URI (for widgets, which cannot point at local files)."""
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail_jpeg(image, width)).decode("ascii")


def banner_figure(src: str | None, name: str, key: str | None, score: float | None = None,
                  href: str | None = None) -> str:
    """One banner as an HTML ``<figure>``: image (or a placeholder), name, app id and score, all escaped."""
    label = name or key or "query image"
    if src:
        image = f'<img src="{_e(src)}" alt="{_e(label)}" title="{_e(label)}" width="150" height="225" loading="lazy">'
    else:
        image = f'<div class="bm-missing" title="{_e(label)}">image unavailable</div>'
    if href:
        image = f'<a href="{_e(href)}">{image}</a>'
    meta = " · ".join(x for x in (f'<span class="bm-key">{_e(key)}</span>' if key else "",
                                   f'<span class="bm-score">{score:.3f}</span>' if score is not None else "") if x)
    return f"<figure>{image}<figcaption>{_e(name)}<br>{meta}</figcaption></figure>"


def match_grid(query_figure: str, match_figures: str) -> str:
    """The query banner beside the grid of its matches."""
    return f'<div class="bm-query bm-grid">{query_figure}<div class="bm-grid">{match_figures}</div></div>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{_PAGE_STYLE}</style></head>'
            f"<body>{body}</body></html>\n")


def _results(features: FeatureSet, queries, k: int, matches: Matches | None, exclude=None) -> list[QueryResult]:
    if queries is None or queries == "all":
        if exclude is not None or matches is None or matches.k < k:
            matches = find_matches(features, k, exclude=exclude)
        return [QueryResult(key, features.name(key), None, matches.of(key)[:k]) for key in features.keys]
    return query(features, queries, k=k, matches=matches, exclude=exclude)


def _write_thumbnails(features: FeatureSet, keys: set[str], folder: Path, progress: bool) -> dict[str, str]:
    """Thumbnails of ``keys`` read in one streaming pass over the collection: {key: relative path}."""
    from tqdm.auto import tqdm

    row = features.index_map()
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, image in tqdm(iter_banners(features, keys), total=len(keys), desc="thumbnails", unit="img",
                           disable=not progress):
        # Files are named by row number, never by the key, so no key can escape the folder.
        name = f"{row[key]}.jpg"
        (folder / name).write_bytes(thumbnail_jpeg(image))
        written[key] = f"{folder.name}/{name}"
    return written


def write_gallery(
    features: FeatureSet,
    queries=None,
    out_dir: str | Path = "gallery",
    k: int = 10,
    images: str = "local",
    matches: Matches | None = None,
    host: str = STEAM_CDN,
    progress: bool = True,
    exclude=None,
) -> Path:
    """Write the gallery of ``queries`` (app ids, names, image files; None or "all" = every banner) and return index.html.

    ``images="local"`` writes thumbnails into ``out_dir/thumbs`` (the folder works offline);
    ``images="cdn"`` links the banners on the Steam CDN at ``host``. ``exclude``: a
    :class:`~bannermatch.reports.Exclusion` (banners kept out of the matches).
    """
    if images not in IMAGE_MODES:
        raise BannermatchError(f"unknown image mode {images!r}; choose one of: {', '.join(IMAGE_MODES)}")
    results = _results(features, queries, k, matches, exclude)
    out = Path(out_dir)
    pages = out / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    shown = {key for r in results for key in r.keys}
    if images == "local":
        thumbs = _write_thumbnails(features, shown, out / "thumbs", progress)
    else:
        thumbs = {key: banner_url(key, host) for key in shown if key.isdigit()}
    page_of = {r.key: f"q{i}.html" for i, r in enumerate(results) if r.key}

    def src(key: str, depth: int) -> str | None:  # thumbnails are relative to the page's folder
        path = thumbs.get(key)
        return path if path is None or images == "cdn" else "../" * depth + path

    def link(key: str) -> str | None:
        return page_of.get(key) or store_page(key)

    label = f"{features.recipe.label} · top-{k} of {len(features.keys)} banners"
    index_items = []
    for i, result in enumerate(results):
        if result.key is None:  # a new image: inline it, there is no file or URL to point at
            qsrc = thumbnail_data_uri(result.image)
        else:
            qsrc = src(result.key, 1)
        query_fig = banner_figure(qsrc, result.name, result.key, href=store_page(result.key))
        grid = "".join(banner_figure(src(key, 1), features.name(key), key, score, link(key))
                       for key, score in result.matches)
        nav = '<p><a href="../index.html">all queries</a></p>'
        body = (f"{nav}<h1>{_e(result.name or result.key or 'query image')}</h1>"
                f'<p class="bm-key">{_e(label)}</p>{match_grid(query_fig, grid)}')
        page = f"q{i}.html"
        (pages / page).write_text(_page(result.name or result.key or "query", body), encoding="utf-8")
        index_src = qsrc if result.key is None else src(result.key, 0)
        index_items.append(banner_figure(index_src, result.name, result.key, href=f"pages/{page}"))
    index = out / "index.html"
    body = (f"<h1>Look-alike Steam banners</h1><p>{_e(label)}; click a banner to see its matches.</p>"
            f'<div class="bm-grid">{"".join(index_items)}</div>')
    index.write_text(_page("Look-alike Steam banners", body), encoding="utf-8")
    return index


#: Page title and file of each report of :mod:`bannermatch.reports`.
_REPORTS = {"Duplicates": ("Duplicate banners", "duplicates.html"),
            "UniqueBanners": ("The most unique banners", "unique.html"),
            "Issues": ("Banner issues", "issues.html"),
            "MostPlayed": ("Look-alikes of the most-played games", "most_played.html")}


def write_report(report, out_dir: str | Path = "gallery", images: str = "local", host: str = STEAM_CDN,
                 progress: bool = True) -> Path:
    """One page for a report of :mod:`bannermatch.reports` (duplicate groups, unique banners, issues, most played):
    its summary, then its rows of banners (name, app id, score), in ``out_dir`` beside the gallery's index.
    Returns the page's path; ``images`` as for :func:`write_gallery`."""
    if images not in IMAGE_MODES:
        raise BannermatchError(f"unknown image mode {images!r}; choose one of: {', '.join(IMAGE_MODES)}")
    try:
        title, file = _REPORTS[type(report).__name__]
    except KeyError:
        raise BannermatchError(f"no gallery page for a {type(report).__name__}") from None
    features = report.features
    rows = report.rows()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = {item for _, items in rows for item, _ in items if isinstance(item, str)}
    if images == "local":
        thumbs = _write_thumbnails(features, keys, out / "thumbs", progress)
    else:
        thumbs = {key: banner_url(key, host) for key in keys if key.isdigit()}
    sections = []
    for label, items in rows:
        figures = "".join(
            banner_figure(thumbs.get(item), features.name(item), item, score, store_page(item)) if isinstance(item, str)
            else banner_figure(thumbnail_data_uri(item), "", None, score) for item, score in items)
        sections.append(f'<h2>{_e(label)}</h2><div class="bm-grid">{figures}</div>')
    nav = '<p><a href="index.html">gallery</a></p>' if (out / "index.html").exists() else ""
    summary = "<br>".join(_e(line) for line in report.summary().splitlines())
    body = (f'{nav}<h1>{_e(title)}</h1><p>{summary}</p>'
            f'<p class="bm-key">{_e(features.recipe.label)} · {len(features.keys)} banners</p>{"".join(sections)}')
    page = out / file
    page.write_text(_page(title, body), encoding="utf-8")
    return page
