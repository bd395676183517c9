"""Evaluation: numbers that say which feature recipe finds look-alike banners best.

Three measures, none of which needs hand labels:

* **Copy detection.** A seeded sample of banners is edited (crop, JPEG, colour, blur, grayscale, flip,
  overlay, 16:9 letterbox); each edited copy is searched among the whole collection and should find its
  original. With exactly one relevant banner per query, AP is ``1/rank`` when the original is among the
  first ``cutoff`` results (100, or the collection size if smaller) and 0 otherwise; mAP is its mean.
* **Franchise proxy.** Games whose names share a franchise stem (:func:`franchise_stem`) count as related;
  precision@k is the share of a banner's k neighbours (itself excluded) in its own franchise, averaged
  over banners whose franchise has at least two banners in the collection. Random neighbours would score
  the ``chance`` column.
* **Agreement.** overlap@k of two recipes' neighbour lists: 1.0 means the settings are redundant.

Features and all-vs-all matches come from the feature store (never embedded twice); the embedded copies
are cached beside the features, so re-running a comparison embeds nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import math
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from .defaults import DEFAULT_STORE
from .display import banner_images
from .errors import BannermatchError
from .extraction import embed_components, extract_features, load_backbone, resolve_limit
from .matches import find_matches
from .pooling import COMPONENTS, view
from .recipe import Recipe, make_recipe
from .search import top_k
from .store import DEFAULT_STORE, FeatureSet
from .files import atomic_write
from .sources import ImageSource, open_source

log = logging.getLogger(__name__)

MAP_CUTOFF = 100  # ranked list considered for copy-detection AP
_COPY_BATCH = 64  # copies generated and embedded at a time (bounds memory for 600x900 banners)
_COPIES_VERSION = 1  # bump when a transform changes, so cached copy features are not reused


# ------------------------------------------------------------------------------------------ transforms
# Each takes an RGB banner and a numpy Generator and returns a new RGB image; all randomness comes from the
# generator, so a copy depends only on the seed, the banner and the transform.

def random_resized_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """35-80% of the area, aspect jittered by up to 4:3, scaled back to the banner's size."""
    w, h = img.size
    area = rng.uniform(0.35, 0.8) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))) * w / h
    cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)


def jpeg_compress(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encoded as JPEG at quality 30-70."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(30, 71)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def colour_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation x0.6-1.4, hue turned by up to 30 degrees."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(0.6, 1.4))
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-1, 1) * 256 / 12)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def gaussian_blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur of radius 1.5-3.5 px at 300 px width (scaled with the banner)."""
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3.5) * img.width / 300))


def grayscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


def horizontal_flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(img)


_OVERLAY_TEXTS = ("NEW", "SALE -50%", "FREE WEEKEND", "EARLY ACCESS", "GOTY", "DLC", "NOW ON STEAM", "UPDATE 2.0")


def text_logo_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A coloured badge (a 'logo') in one corner and a caption in a band across the banner."""
    img = img.copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    size = int(w * rng.uniform(0.18, 0.3))
    x = int(rng.choice([0.04, 0.96 - size / w]) * w)
    y = int(rng.choice([0.03, 0.97 - size / h]) * h)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw.ellipse([x, y, x + size, y + size], fill=colour, outline=(255, 255, 255), width=max(1, size // 12))
    font = ImageFont.load_default(size=max(8, int(h * rng.uniform(0.05, 0.08))))
    text = str(rng.choice(_OVERLAY_TEXTS))
    top = int(h * rng.uniform(0.35, 0.8))
    left, t, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.rectangle([0, top - 4, w, top + bottom - t + 4], fill=(0, 0, 0))
    draw.text(((w - (right - left)) // 2, top - t), text, font=font, fill=(255, 255, 255))
    return img


def letterbox_16_9(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The banner centred on a 16:9 canvas of the same height, with dark borders (a store capsule / video frame)."""
    w, h = img.size
    shade = int(rng.integers(0, 60))
    canvas = Image.new("RGB", (max(w, round(h * 16 / 9)), h), (shade, shade, shade))
    canvas.paste(img, ((canvas.width - w) // 2, 0))
    return canvas


# The mild edits a catalogue's duplicates really show (a re-upload, a re-release): what a duplicate threshold is
# calibrated on (bannermatch.reports.duplicates), as against the strong edits above that copy detection searches.

def reencode(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encoded as JPEG at quality 55-85."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(55, 86)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def rescale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Shrunk to 55-80% and scaled back (a copy saved at another size)."""
    w, h = img.size
    f = rng.uniform(0.55, 0.8)
    return img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR).resize((w, h), Image.BICUBIC)


def title_strip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A re-release: a dark band over the bottom 8-15% with an edition's name."""
    img = img.copy()
    w, h = img.size
    top = round(h * (1 - rng.uniform(0.08, 0.15)))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, top, w, h], fill=tuple(int(c) for c in rng.integers(0, 60, 3)))
    font = ImageFont.load_default(size=max(8, (h - top) // 2))
    draw.text((w // 2, (top + h) // 2), str(rng.choice(_EDITIONS)), font=font, fill=(235, 205, 120), anchor="mm")
    return img


_EDITIONS = ("DEFINITIVE EDITION", "REMASTERED", "GAME OF THE YEAR", "ANNIVERSARY", "COMPLETE EDITION")


def brightness(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness x0.88-1.12."""
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.88, 1.12))


def trim(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """2-6% of the area cut off along the top or bottom and one side, scaled back."""
    w, h = img.size
    share = 1 - math.sqrt(1 - rng.uniform(0.02, 0.06))  # of each of the two edges
    dx, dy = round(w * share), round(h * share)
    left, top = dx * int(rng.integers(0, 2)), dy * int(rng.integers(0, 2))
    return img.crop((left, top, left + w - dx, top + h - dy)).resize((w, h), Image.BICUBIC)


def tint(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blended 5-10% with a colour."""
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return Image.blend(img, Image.new("RGB", img.size, colour), rng.uniform(0.05, 0.1))


TRANSFORMS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "crop": random_resized_crop,
    "jpeg": jpeg_compress,
    "colour": colour_jitter,
    "blur": gaussian_blur,
    "grayscale": grayscale,
    "flip": horizontal_flip,
    "overlay": text_logo_overlay,
    "letterbox": letterbox_16_9,
    "reencode": reencode,
    "rescale": rescale,
    "title": title_strip,
    "brightness": brightness,
    "trim": trim,
    "tint": tint,
}
#: copy detection's default edits (``evaluate``): the strong ones
STRONG_EDITS = ("crop", "jpeg", "colour", "blur", "grayscale", "flip", "overlay", "letterbox")
#: the edits a catalogue's duplicates show (the duplicate threshold's calibration)
MILD_EDITS = ("reencode", "rescale", "title", "brightness", "trim", "tint")


def transformed_copy(img: Image.Image, transform: str, seed: int, key: str) -> Image.Image:
    """The ``transform`` of one banner, the same on every run for the same (seed, key, transform)."""
    check_transforms([transform])
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), list(TRANSFORMS).index(transform)])
    return TRANSFORMS[transform](img.convert("RGB"), rng)


def check_transforms(transforms: Iterable[str] | None) -> tuple[str, ...]:
    """The named edits, each once (default: the strong edits); an unknown name is an error that lists them."""
    names = STRONG_EDITS if transforms is None else tuple(dict.fromkeys(transforms))
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown or not names:
        raise BannermatchError(f"unknown transform {', '.join(unknown) or '(none given)'}; choose from: {', '.join(TRANSFORMS)}")
    return names


# ------------------------------------------------------------------------------------------ metrics

def copy_detection(
    copy_features: np.ndarray,
    database: np.ndarray,
    true_index: np.ndarray,
    transforms: Sequence[str] | None = None,
    k: int = 10,
    cutoff: int = MAP_CUTOFF,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """recall@1, recall@k and mAP@cutoff of copies searched among ``database``, overall and per transform.

    ``true_index[i]`` is the database row of copy i's original; ``transforms[i]`` names its edit. Returns
    ``{"all": {...}, "<transform>": {...}}``; ``cutoff`` is capped at the database size.
    """
    true_index = np.asarray(true_index)
    if len(copy_features) != len(true_index) or (transforms is not None and len(transforms) != len(true_index)):
        raise BannermatchError("copy_detection needs one true index (and transform name) per copy")
    cutoff = _cutoff(k, len(database), cutoff)
    idx, _ = top_k(copy_features, database, cutoff, device=device)
    hit = idx == true_index[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)  # 0: not within the cutoff
    groups = {"all": np.ones(len(rank), bool)}
    if transforms is not None:
        names = np.asarray(transforms)
        groups.update({t: names == t for t in dict.fromkeys(transforms)})
    return {name: _rank_metrics(rank[sel], k, cutoff) for name, sel in groups.items()}


def _cutoff(k: int, n: int, cutoff: int = MAP_CUTOFF) -> int:
    return min(max(cutoff, k), n)


def _rank_metrics(rank: np.ndarray, k: int, cutoff: int) -> dict[str, float]:
    found = rank > 0
    return {
        "recall@1": float(np.mean(rank == 1)),
        f"recall@{k}": float(np.mean(found & (rank <= k))),
        f"mAP@{cutoff}": float(np.mean(np.where(found, 1.0 / np.maximum(rank, 1), 0.0))),
        "copies": int(len(rank)),
    }


_SUBTITLE = re.compile(r"\s*(?::|\s[-–—~|]\s)")
_BRACKETS = re.compile(r"[(\[][^)\]]*[)\]]")
_MARKS = re.compile(r"[®™©℗]")
_THOUSANDS = re.compile(r"(?<=\d)[,.](?=\d{3}\b)")  # "40,000" is one number, not "40" and "000"
_PHRASES = {  # multi-word edition names, folded to one token before the trailing tokens are stripped
    "game of the year": "goty", "director s cut": "directorscut", "directors cut": "directorscut",
    "collector s": "collectors",
}
_EDITION_WORDS = {
    "goty", "directorscut", "remastered", "remaster", "remake", "definitive", "enhanced", "complete", "deluxe",
    "ultimate", "special", "anniversary", "collectors", "gold", "premium", "standard", "legendary", "extended",
    "edition", "hd", "redux", "classic", "collection", "vr", "reloaded", "touch",
    "episode", "chapter", "part", "vol", "volume", "season", "prologue", "demo",  # "<series> Episode 2"
}
_ROMAN = re.compile(r"^(?:x{0,3})(?:ix|iv|v?i{0,3})$")


def franchise_stem(name: str) -> str:
    """The franchise part of a game name, lower-case and punctuation-free ("" when nothing but digits is left).

    Rules, in order: Unicode folded (accents, full-width forms, curly quotes); ®/™/© and bracketed text
    dropped; the subtitle cut at the first ':', ' - ', ' – ', ' — ', ' ~ ' or ' | '; a leading "The" dropped;
    then, while more than one word is left, a trailing sequel number (up to 4 digits, so "Warhammer 40,000"
    keeps its 40000), roman numeral (I-XXXIX) or edition word ("Remastered", "GOTY", "Game of the Year",
    "Director's Cut", "Definitive/Enhanced/Deluxe... Edition", "HD", "Classic", "VR", "Episode", "Demo"...) is
    removed. A name with nothing but digits left has no stem.
    "Euro Truck Simulator 2" -> "euro truck simulator"; "Call of Duty® 4: Modern Warfare®" -> "call of duty".
    """
    text = unicodedata.normalize("NFKD", _MARKS.sub("", name))
    text = "".join(c for c in text if not unicodedata.combining(c)).replace("’", "'")
    head = _SUBTITLE.split(_BRACKETS.sub(" ", text), maxsplit=1)[0]
    text = head if head.strip() else text
    text = _THOUSANDS.sub("", text.casefold())
    text = re.sub(r"[\W_]+", " ", text).strip()  # \w keeps letters of every script
    for phrase, token in _PHRASES.items():
        text = re.sub(rf"\b{phrase}\b", token, text)
    words = text.split()
    if len(words) > 1 and words[0] == "the":
        words = words[1:]
    while len(words) > 1 and (words[-1] in _EDITION_WORDS or _ROMAN.match(words[-1])
                              or (words[-1].isdigit() and len(words[-1]) <= 4)):
        words.pop()
    return "" if all(w.isdigit() for w in words) else " ".join(words)  # a bare number is no franchise


def franchise_groups(names: dict[str, str]) -> dict[str, list[str]]:
    """``{stem: [keys]}`` for every franchise stem shared by at least two of ``names`` ({key: game name})."""
    groups: dict[str, list[str]] = {}
    for key, name in names.items():
        stem = franchise_stem(name or "")
        if stem:
            groups.setdefault(stem, []).append(key)
    return {stem: sorted(keys) for stem, keys in groups.items() if len(keys) >= 2}


def franchise_precision(
    neighbours: np.ndarray, keys: Sequence[str], groups: dict[str, list[str]], k: int | None = None
) -> dict[str, float]:
    """Mean precision@k of same-franchise neighbours over banners whose franchise has >= 2 members in ``keys``.

    ``neighbours[i]`` are indices into ``keys`` (the query itself already excluded, as find_matches does).
    Returns ``precision@k``, the ``chance@k`` a random ranking would score, and the number of ``queries``.
    """
    k = neighbours.shape[1] if k is None else k
    if k > neighbours.shape[1]:
        raise BannermatchError(f"precision@{k} needs at least {k} neighbours per banner, not {neighbours.shape[1]}")
    present = {key: i for i, key in enumerate(keys)}
    group_of = np.full(len(keys), -1)
    sizes = []
    for members in groups.values():
        rows = [present[m] for m in members if m in present]
        if len(rows) >= 2:
            group_of[rows] = len(sizes)
            sizes.append(len(rows))
    queries = np.flatnonzero(group_of >= 0)
    if not len(queries):
        return {f"precision@{k}": float("nan"), f"chance@{k}": float("nan"), "queries": 0}
    same = group_of[neighbours[queries, :k]] == group_of[queries, None]
    others = len(keys) - 1
    chance = np.mean([(sizes[group_of[q]] - 1) / others for q in queries])
    return {f"precision@{k}": float(same.mean()), f"chance@{k}": float(chance), "queries": int(len(queries))}


def overlap_at_k(neighbours_a: np.ndarray, neighbours_b: np.ndarray) -> float:
    """Mean share of neighbours two rankings have in common (same rows, same index space, k = their width)."""
    if neighbours_a.shape != neighbours_b.shape:
        raise BannermatchError(f"neighbour lists differ in shape: {neighbours_a.shape} vs {neighbours_b.shape}")
    k = neighbours_a.shape[1]
    common = [len(set(a) & set(b)) for a, b in zip(neighbours_a.tolist(), neighbours_b.tolist())]
    return float(np.mean(common) / k) if common else float("nan")


# ------------------------------------------------------------------------------------------ comparison

@dataclass
class Comparison:
    """One row of numbers per recipe, plus the overlap@k agreement between every two recipes."""

    rows: list[dict]
    agreement: np.ndarray  # [R, R], rows and columns in the order of ``rows``
    k: int
    transforms: tuple[str, ...]

    SUMMARY = ("copy recall@1", "copy recall@{k}", "copy mAP@{cutoff}", "franchise precision@{k}", "franchise chance@{k}")

    @property
    def labels(self) -> list[str]:
        """Row names for tables and plots: the recipe label, or its slug where two labels clash."""
        labels = [r["label"] for r in self.rows]
        return [r["slug"] if labels.count(r["label"]) > 1 else r["label"] for r in self.rows]

    def _summary_columns(self) -> list[str]:
        cutoff = self.rows[0]["cutoff"] if self.rows else MAP_CUTOFF
        return list(dict.fromkeys(c.format(k=self.k, cutoff=cutoff) for c in self.SUMMARY))

    def to_markdown(self) -> str:
        """Summary table, per-transform recall@1 / mAP, and the agreement matrix, as GitHub markdown."""
        labels = [_md(label) for label in self.labels]
        cols = self._summary_columns()
        cutoff = self.rows[0]["cutoff"] if self.rows else MAP_CUTOFF
        out = [_md_table(["recipe", "banners", *cols],
                         [[label, str(r["banners"]), *(_fmt(r[c]) for c in cols)] for label, r in zip(labels, self.rows)])]
        out.append(f"\nCopy detection per transform (recall@1 / mAP@{cutoff}):\n")
        out.append(_md_table(["recipe", *self.transforms],
                             [[label, *(f"{_fmt(r[f'{t} recall@1'])} / {_fmt(r[f'{t} mAP@{cutoff}'])}" for t in self.transforms)]
                              for label, r in zip(labels, self.rows)]))
        out.append(f"\nAgreement (overlap@{self.k} of neighbour lists):\n")
        out.append(_md_table(["recipe", *labels], [[label, *map(_fmt, row)] for label, row in zip(labels, self.agreement)]))
        return "\n".join(out) + "\n"

    def to_csv(self, path: str | Path) -> Path:
        """Every number of every row (summary and per transform), one row per recipe."""
        path = Path(path)
        columns = list(dict.fromkeys(c for r in self.rows for c in r))
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def plot(self):
        """Grouped bar chart of the summary metrics, one bar per recipe (franchise chance as a dashed line)."""
        import matplotlib.pyplot as plt

        metrics = [c for c in self._summary_columns() if "chance" not in c]
        width = 0.8 / max(1, len(self.rows))
        fig, ax = plt.subplots(figsize=(2.2 * len(metrics) + 2, 4.5))
        for i, (label, row) in enumerate(zip(self.labels, self.rows)):
            xs = np.arange(len(metrics)) + (i - (len(self.rows) - 1) / 2) * width
            ax.bar(xs, [row[m] for m in metrics], width, label=label)
        chance = [r[f"franchise chance@{self.k}"] for r in self.rows]
        if chance and not all(math.isnan(c) for c in chance):
            x = metrics.index(f"franchise precision@{self.k}")
            ax.hlines(np.nanmax(chance), x - 0.45, x + 0.45, colors="k", linestyles="dashed", label="franchise chance")
        ax.set_xticks(np.arange(len(metrics)), metrics)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("score")
        ax.set_title(f"bannermatch evaluation ({self.rows[0]['banners'] if self.rows else 0} banners)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
        fig.tight_layout()
        return fig

    def save(self, out: str | Path) -> dict[str, Path]:
        """results.csv, results.md and results.png in ``out``."""
        import matplotlib.pyplot as plt

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": self.to_csv(out / "results.csv"), "md": out / "results.md", "png": out / "results.png"}
        paths["md"].write_text(self.to_markdown(), encoding="utf-8")
        fig = self.plot()
        fig.savefig(paths["png"], dpi=120)
        plt.close(fig)
        return paths


def _fmt(value) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def recipe_grid(
    models: Sequence[str],
    strategies: Sequence[str] = ("simple",),
    preprocess: Sequence[str] = ("crop",),
    multiscale: Sequence[bool] = (False,),
    **recipe_options,
) -> list[Recipe]:
    """Every combination of the lists as a recipe (``recipe_options`` go to make_recipe).

    Combinations a model cannot run (e.g. multiscale on timm BEiT) are skipped with a warning.
    """
    recipes = []
    for model, strategy, prep, ms in itertools.product(models, strategies, preprocess, multiscale):
        try:
            recipes.append(make_recipe(model, strategy, prep, ms, **recipe_options))
        except BannermatchError as exc:
            if ms and "multiscale" in str(exc):
                log.warning("skipped %s %s %s multiscale: %s", model, strategy, prep, exc)
                continue
            raise
    if not recipes:
        raise BannermatchError("no valid setting in the grid")
    return list(dict.fromkeys(recipes))


def compare(
    images: str | Path | ImageSource,
    recipes: Iterable[Recipe],
    store: str | Path = DEFAULT_STORE,
    weights: str | Path | None = None,
    device: str | None = None,
    k: int = 10,
    n_queries: int = 200,
    seed: int = 0,
    transforms: Iterable[str] | None = None,
    progress: bool = True,
    dtype: str = "auto",
    limit: int | str | None = None,
    include: Iterable[str] = (),
) -> Comparison:
    """Copy detection, franchise precision@k and agreement for each recipe on one collection of banners.

    Features come from (or go into) the feature store, matches are cached there too, and so are the
    embedded copies: a second call with the same arguments embeds nothing. ``limit``: compare on a sample
    (``auto``: all banners on a GPU, a sample on a CPU; see :func:`~bannermatch.extraction.resolve_limit`). Recipes that differ only in their
    strategy share one forward pass, over the collection and over the copies.
    """
    recipes = list(dict.fromkeys(recipes))
    if not recipes:
        raise BannermatchError("compare needs at least one recipe")
    if n_queries < 1:
        raise BannermatchError("n_queries must be at least 1")
    transforms = check_transforms(transforms)
    source = images if isinstance(images, ImageSource) else open_source(images)
    if (limit := resolve_limit(limit, device)) is not None:
        source = source.sample(limit, include=include)
    rows, neighbour_lists = [], []
    for recipe in recipes:
        fs = extract_features(source, recipe, store, weights, device, progress=progress, dtype=dtype)
        matches = find_matches(fs, k, device)
        copies, true_index, copy_names = copy_features(fs, weights, device, n_queries, seed, transforms, progress,
                                                        dtype)
        copy = copy_detection(copies, fs.features, true_index, copy_names, k, device=device)
        groups = franchise_groups({key: fs.name(key) for key in fs.keys})
        franchise = franchise_precision(matches.neighbours, fs.keys, groups, k)
        rows.append(_row(recipe, fs, copy, franchise, k, transforms))
        neighbour_lists.append((fs.keys, matches.neighbours))
    agreement = np.array([[_aligned_overlap(a, b) for b in neighbour_lists] for a in neighbour_lists])
    return Comparison(rows, agreement, k, transforms)


def _row(recipe: Recipe, fs: FeatureSet, copy: dict, franchise: dict, k: int, transforms: tuple[str, ...]) -> dict:
    cutoff = _cutoff(k, len(fs.keys))
    row = {"label": recipe.label, "slug": recipe.slug, "model": recipe.model, "strategy": recipe.strategy,
           "preprocess": recipe.preprocess, "multiscale": recipe.multiscale, "banners": len(fs.keys),
           "cutoff": cutoff, "copy queries": copy["all"]["copies"]}
    row.update({f"copy {m}": v for m, v in copy["all"].items() if m != "copies"})
    row.update({"franchise queries": franchise["queries"], f"franchise precision@{k}": franchise[f"precision@{k}"],
                f"franchise chance@{k}": franchise[f"chance@{k}"]})
    for t in transforms:
        row.update({f"{t} {m}": v for m, v in copy[t].items() if m != "copies"})
    return row


def _aligned_overlap(a: tuple[list[str], np.ndarray], b: tuple[list[str], np.ndarray]) -> float:
    """overlap@k of two feature sets' neighbours (as keys) over the banners both hold (usually all of them)."""
    (keys_a, nb_a), (keys_b, nb_b) = a, b
    row_b = {key: i for i, key in enumerate(keys_b)}
    common = [i for i, key in enumerate(keys_a) if key in row_b]
    return overlap_at_k(np.asarray(keys_a)[nb_a[common]], np.asarray(keys_b)[nb_b[[row_b[keys_a[i]] for i in common]]])


def copy_features(fs: FeatureSet, weights=None, device=None, n_queries: int = 200, seed: int = 0,
                  transforms: Sequence[str] | None = None, progress: bool = True, dtype: str = "auto",
                  one_edit_each: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of edited copies of a seeded sample of ``n_queries`` banners: each banner under every one of
    ``transforms``, or (``one_edit_each``) under one of them in turn. Their pooling components are cached beside
    the features, so every strategy of the same forward pass reads them without embedding again.

    Returns (features [copies, D] in sample order, the database row of each copy's original, each copy's edit).
    """
    from tqdm.auto import tqdm

    keys = sorted(fs.keys)
    rng = np.random.default_rng(seed)
    sample = [keys[i] for i in sorted(rng.choice(len(keys), min(n_queries, len(keys)), replace=False))]
    originals = banner_images(fs, sample)
    sample = [key for key in sample if originals[key] is not None]
    if not sample:
        raise BannermatchError(f"the banners of {fs.path} cannot be read from {fs.images!r}; was the folder moved?")
    transforms = check_transforms(transforms)
    contents = [fs.digests[fs.index_of(key)] for key in sample]
    if one_edit_each:
        jobs = [(key, transforms[i % len(transforms)]) for i, key in enumerate(sample)]
    else:
        jobs = [(key, t) for key in sample for t in transforms]
    digest = hashlib.sha256(json.dumps([_COPIES_VERSION, seed, jobs, contents]).encode()).hexdigest()[:16]
    cache = fs.path / f"copies.{digest}.npz"
    true_index = np.array([fs.index_of(key) for key, _ in jobs], np.int64)
    names = [t for _, t in jobs]
    try:
        with np.load(cache, allow_pickle=False) as data:
            parts = {name: data[name] for name in COMPONENTS}
        if len(parts["cls"]) == len(true_index):
            return view(parts, fs.recipe).numpy(), true_index, names
        log.warning("%s does not match its sample; embedding the copies again", cache)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError):
        log.warning("%s is damaged; embedding the copies again", cache)
    backbone = load_backbone(fs.recipe, weights, device, dtype)
    out: dict[str, list[np.ndarray]] = {name: [] for name in COMPONENTS}
    with tqdm(total=len(jobs), desc=f"embedding copies {fs.recipe.label}", unit="img", disable=not progress) as bar:
        for start in range(0, len(jobs), _COPY_BATCH):
            batch = [transformed_copy(originals[key], t, seed, key) for key, t in jobs[start:start + _COPY_BATCH]]
            for name, values in embed_components(batch, fs.recipe, backbone).items():
                out[name].append(values)
            bar.update(len(batch))
    parts = {name: np.concatenate(values) for name, values in out.items()}
    atomic_write(cache, lambda fh: np.savez(fh, **parts))
    return view(parts, fs.recipe).numpy(), true_index, names
