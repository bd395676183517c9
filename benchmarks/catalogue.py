"""Planted catalogues from real photos: distinct pictures cut to 300x450 banners, plus the duplicates a Steam
catalogue really has, each under its own app id, with the truth kept beside them.

Pictures come from Debian packages (nothing downloaded by this module): ``games-thumbnails`` (593 screenshots of
free games: many look alike, the hard negatives a game catalogue has) and the wallpapers of
``gnome-backgrounds``, ``mate-backgrounds`` and ``plasma-workspace-wallpapers`` (one file per wallpaper: the
packages ship each in several sizes). ``apt-get install games-thumbnails gnome-backgrounds mate-backgrounds
plasma-workspace-wallpapers``.

The planted duplicates are the mild edits a catalogue holds (``EDITS``): the same bytes under another app id, a
JPEG re-encode at quality 60, a resize to 200x300 and back, a re-release with a title strip over the bottom 12%,
+10% brightness, a 5% crop, a tint; one original with two copies; one placeholder under 6 app ids; and broken
banners (truncated, empty, not an image, black, white, tiny).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

SIZE = (300, 450)
_FLAT = 8.0  # grey standard deviation under which a picture is one flat tone (a blank wallpaper layer)
_TERMINAL_DARK = 0.6  # share of near-black pixels above which a screenshot is a text terminal's
_SAME_PICTURE = 12.0  # mean absolute grey difference (0-255) at 32x48 under which two pictures count as one
GAMES = Path("/usr/share/games/thumbnails")
WALLPAPER_DIRS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _reencode(img: Image.Image) -> Image.Image:
    return Image.open(io.BytesIO(_jpeg_bytes(img, 60))).convert("RGB")


def _resize(img: Image.Image) -> Image.Image:
    return img.resize((200, 300), Image.BILINEAR).resize(SIZE, Image.BICUBIC)


def _title_strip(img: Image.Image) -> Image.Image:
    """A re-release: a dark band over the bottom 12% with the edition's name."""
    img = img.copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    top = round(h * 0.88)
    draw.rectangle([0, top, w, h], fill=(18, 16, 24))
    font = ImageFont.load_default(size=int(h * 0.06))
    draw.text((w // 2, (top + h) // 2), "DEFINITIVE EDITION", font=font, fill=(235, 200, 90), anchor="mm")
    return img


def _brighter(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.1)


def _crop(img: Image.Image) -> Image.Image:
    """5% of the area cut off (the top and one side), scaled back."""
    w, h = img.size
    return img.crop((round(w * 0.025), round(h * 0.025), w, h)).resize(SIZE, Image.BICUBIC)


def _tint(img: Image.Image) -> Image.Image:
    return Image.blend(img, Image.new("RGB", img.size, (255, 140, 40)), 0.08)


EDITS: dict[str, Callable[[Image.Image], Image.Image] | None] = {
    "exact": None,  # the same file under another app id
    "reencode": _reencode, "resize": _resize, "title": _title_strip, "brightness": _brighter, "crop": _crop,
    "tint": _tint,
}


def _wallpapers() -> list[Path]:
    """One file per wallpaper (the largest), skipping previews and the packages' size variants."""
    best: dict[str, tuple[int, Path]] = {}
    for root in WALLPAPER_DIRS:
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp") or "screenshot" in path.name.lower():
                continue
            parts = path.relative_to(root).parts
            name = parts[0] if root.name == "wallpapers" else path.stem.rsplit("-", 1)[0] if "gnome" in parts else path.stem
            size = path.stat().st_size
            if size > best.get(name, (0, path))[0]:
                best[name] = (size, path)
    return sorted(p for _, p in best.values())


def pictures(kind: str) -> list[Path]:
    """The picture files of a catalogue kind: ``games`` or ``wallpapers``."""
    files = sorted(p for p in GAMES.glob("*") if p.is_file()) if kind == "games" else _wallpapers()
    if not files:
        raise SystemExit(f"no {kind} pictures: apt-get install games-thumbnails gnome-backgrounds mate-backgrounds "
                         "plasma-workspace-wallpapers")
    return files


def to_banner(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (SIZE[0] * 2, SIZE[1] * 2))
            return ImageOps.fit(img.convert("RGB"), SIZE, Image.BICUBIC)
    except OSError:
        return None


def _broken(folder: Path, next_id: Callable[[], str]) -> list[str]:
    good = _jpeg_bytes(Image.new("RGB", SIZE, (90, 120, 150)), 90)
    files = {
        "truncated": good[: len(good) // 3], "empty": b"", "not an image": b"<html>404</html>",
        "black": _jpeg_bytes(Image.new("RGB", SIZE, (0, 0, 0)), 90),
        "white": _jpeg_bytes(Image.new("RGB", SIZE, (255, 255, 255)), 90),
        "tiny": _jpeg_bytes(Image.new("RGB", (30, 45), (200, 30, 30)), 90),
    }
    keys = []
    for data in files.values():
        key = next_id()
        (folder / f"{key}.jpg").write_bytes(data)
        keys.append(key)
    return keys


def build(folder: str | Path, kind: str = "games", originals: int = 200, per_edit: int = 12, seed: int = 0) -> dict:
    """Write a planted catalogue into ``folder`` (``<appid>.jpg``) and ``truth.json``; returns the truth:
    ``groups`` (lists of app ids that are the same picture), ``edits`` ({copy: (original, edit)}), ``broken``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = pictures(kind)
    rng.shuffle(files)
    banners: list[Image.Image] = []
    thumbs: list[np.ndarray] = []
    for path in files:
        if len(banners) == originals:
            break
        if (img := to_banner(path)) is None:
            continue
        # the packages ship some pictures twice (one game's screenshot in two packages, black terminal windows):
        # such an "original" would be an unlabelled duplicate, so pictures this close in plain pixels are left out
        thumb = np.asarray(img.convert("L").resize((32, 48), Image.BOX), np.float32)
        if thumb.std() < _FLAT or (thumb < 24).mean() > _TERMINAL_DARK:  # text on a black terminal: they all look alike, unlabelled
            continue
        if any(np.abs(thumb - t).mean() < _SAME_PICTURE for t in thumbs):
            continue
        banners.append(img)
        thumbs.append(thumb)
    ids = iter(range(100000, 10**7, 10))
    next_id = lambda: str(next(ids))  # noqa: E731
    order = list(range(len(banners)))
    rng.shuffle(order)
    keys = [next_id() for _ in banners]
    for key, img in zip(keys, banners):
        (folder / f"{key}.jpg").write_bytes(_jpeg_bytes(img, 90))
    groups: dict[str, list[str]] = {}
    edits: dict[str, tuple[str, str]] = {}
    per_edit = min(per_edit, (len(banners) - 1) // len(EDITS))  # each original is planted at most once
    planted = iter(order)
    for edit, fn in EDITS.items():
        for _ in range(per_edit):
            i = next(planted)
            copy = next_id()
            data = (folder / f"{keys[i]}.jpg").read_bytes() if fn is None else _jpeg_bytes(fn(banners[i]), 90)
            (folder / f"{copy}.jpg").write_bytes(data)
            groups.setdefault(keys[i], [keys[i]]).append(copy)
            edits[copy] = (keys[i], edit)
    i = next(planted)  # one original with two copies
    for edit in ("reencode", "title"):
        copy = next_id()
        (folder / f"{copy}.jpg").write_bytes(_jpeg_bytes(EDITS[edit](banners[i]), 90))
        groups.setdefault(keys[i], [keys[i]]).append(copy)
        edits[copy] = (keys[i], edit)
    placeholder = Image.new("RGB", SIZE, (27, 40, 56))  # Steam's dark blue, with a logo-like mark
    draw = ImageDraw.Draw(placeholder)
    draw.ellipse([100, 175, 200, 275], outline=(102, 192, 244), width=8)
    data = _jpeg_bytes(placeholder, 90)
    holders = [next_id() for _ in range(6)]
    for key in holders:
        (folder / f"{key}.jpg").write_bytes(data)
    groups[holders[0]] = holders
    broken = _broken(folder, next_id)
    truth = {"kind": kind, "originals": len(banners), "groups": list(groups.values()), "edits": edits,
             "broken": broken, "placeholder": holders}
    (folder / "truth.json").write_text(json.dumps(truth))
    return truth
