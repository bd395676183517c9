"""Image measures: one streaming pass over the stored banners, cached beside the features per banner content.

A digest of the decoded pixels and a perceptual hash (what the duplicate report links), and brightness,
sharpness, entropy, colour and size (what the issue detectors read). They are kept in ``image_stats.json``,
keyed by each banner's byte digest, so a re-run reads only banners that are new.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
from PIL import Image

from ..display import iter_banners
from ..errors import BannermatchError
from ..store import FeatureSet
from .tables import write_json

log = logging.getLogger(__name__)

STATS_FILE = "image_stats.json"
_STATS_VERSION = 2  # bump when a measure changes, so cached measures are recomputed (2: the perceptual hash)
_ANALYSIS_SIDE = 256  # px: images are measured with their short side at most this, so sizes compare
_HASH_SIDE = 32  # px: the perceptual hash's grey thumbnail, whose 8x8 lowest frequencies it keeps
_DCT = np.cos(np.pi * (2 * np.arange(_HASH_SIDE)[None, :] + 1) * np.arange(_HASH_SIDE)[:, None] / (2 * _HASH_SIDE))


def perceptual_hash(img: Image.Image) -> str:
    """The DCT perceptual hash (pHash, as imagehash and imagededup compute it): the grey image at 32x32, its 8x8
    lowest 2-D DCT frequencies, each bit set where a coefficient is above their median (the DC term left out of
    the median). 64 bits as 16 hex digits; re-encodes, resizes and small tints keep nearly all bits."""
    grey = np.asarray(img.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.LANCZOS), np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def measure_image(img: Image.Image) -> dict:
    """The measures of one decoded RGB banner that the issue detectors and exact duplicates read.

    ``pixels``: sha256 (16 hex) of the size and decoded RGB pixels (the same picture saved twice has one, a
    re-encoded one does not); ``phash``: the perceptual hash (:func:`perceptual_hash`, 16 hex); ``bright99``/``bright5``: the 99th/5th percentile of luminance (0-1);
    ``laplacian``: variance of the 4-neighbour Laplacian of the luminance stretched to the full 0-255 range
    (so dark or faded banners are not called blurry for their low contrast); ``entropy``: bits of the 256-level
    grey histogram; ``chroma``: 99th percentile of max-min over the RGB channels (0-255); ``width``/``height``.
    Everything but ``pixels`` and ``phash`` is measured with the short side at most 256 px.
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
    return {"pixels": pixels, "phash": perceptual_hash(img), "width": w, "height": h, "bright99": float(p99) / 255, "bright5": float(p5) / 255,
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
        write_json(path, {"version": _STATS_VERSION,
                           "measures": {d: m for d, m in measures.items() if d in current}})
    return {key: measures[d] for key, d in zip(features.keys, features.digests) if d in measures}
