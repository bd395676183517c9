"""Image sources: ``(key, image)`` from a folder, a tar/zip archive read in place, or webdataset shards.

A source is listed once, cheaply (names, sizes and the small JSON metadata of webdataset samples), which
gives every image a stable index, its key (the Steam app id) and a fingerprint of the whole collection.
Bytes are read later, only for the indices asked for, so interrupted runs can skip finished work and
DataLoader workers can split the collection without reading each other's images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BannermatchError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
_APPID_IN_URL = re.compile(r"/apps/(\d+)/")


@dataclass(frozen=True)
class Entry:
    """One image of a source: its key, where its bytes live, and optional metadata (game name)."""

    key: str
    container: str  # file path of the image, or of the archive holding it
    member: str  # archive member name ("" for plain files)
    size: int
    name: str | None = None


@dataclass
class Report:
    """What a run skipped, and why; saved with the features so nothing is lost silently."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key or member, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (key, ignored location)

    def skip(self, what: str, reason: str) -> None:
        log.warning("skipped %s: %s", what, reason)
        self.skipped.append((what, reason))

    def to_dict(self) -> dict:
        return {"skipped": [list(s) for s in self.skipped], "duplicates": [list(d) for d in self.duplicates]}


class SkipImage(Exception):
    """An entry that cannot be used as an image; the message is the reason that goes in the report."""


# --------------------------------------------------------------------------------------------- decoding

def decode_image(data: bytes) -> Image.Image:
    """Decode bytes to an RGB image: EXIF orientation applied, alpha over white, 16-bit scaled, first frame.

    Raises :class:`SkipImage` with a short reason for anything that is not a usable image.
    """
    if not data:
        raise SkipImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipImage(f"too large ({exc.__class__.__name__})") from None
    except UnidentifiedImageError:
        raise SkipImage("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise SkipImage(f"corrupt image ({exc})") from None
    return prepare_image(img)


def prepare_image(img: Image.Image) -> Image.Image:
    """An opened image as every banner and query is used: EXIF orientation applied, then RGB (:func:`to_rgb`)."""
    try:
        return to_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError) as exc:
        raise SkipImage(f"corrupt image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray((arr / scale * 255.0).clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------- sources

class ImageSource:
    """A listed collection of images. Build one with :func:`open_source`."""

    kind = "base"

    def __init__(self, path: Path, entries: list[Entry], report: Report):
        self.path = path
        self.entries = entries
        self.report = report  # problems found while listing (unsafe members, duplicates)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def names(self) -> dict[str, str]:
        return {e.key: e.name for e in self.entries if e.name}

    def fingerprint(self) -> str:
        """Identifies the collection by its keys, locations and sizes, without reading any image."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(f"{e.key}\0{Path(e.container).name}\0{e.member}\0{e.size}\n".encode())
        return h.hexdigest()[:16]

    def read(self, wanted: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, Entry, bytes]]:
        """Yield ``(index, entry, bytes)`` for the wanted indices, in index order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[str, Image.Image]]:
        """``(key, RGB image)`` for every usable image; unusable ones are logged and reported."""
        for _, entry, data in self.read():
            try:
                yield entry.key, decode_image(data)
            except SkipImage as exc:
                self.report.skip(entry.key, str(exc))


class FolderSource(ImageSource):
    kind = "folder"

    def read(self, wanted=lambda i: True):
        for i, e in enumerate(self.entries):
            if wanted(i):
                try:
                    data = Path(e.container).read_bytes()
                except OSError as exc:
                    data = b""
                    log.warning("cannot read %s: %s", e.container, exc)
                yield i, e, data


class TarSource(ImageSource):
    """Tar archives (plain or compressed), including img2dataset's webdataset shards."""

    kind = "tar"

    def read(self, wanted=lambda i: True):
        by_container: dict[str, dict[str, int]] = {}
        for i, e in enumerate(self.entries):
            if wanted(i):
                by_container.setdefault(e.container, {})[e.member] = i
        for container, members in by_container.items():
            # Sequential reading works for compressed archives too; member data is only read when wanted.
            with tarfile.open(container, "r:*") as tar:
                for info in tar:
                    i = members.pop(info.name, None)
                    if i is None:
                        continue
                    f = tar.extractfile(info)
                    yield i, self.entries[i], f.read() if f else b""
                    if not members:
                        break


class ZipSource(ImageSource):
    kind = "zip"

    def read(self, wanted=lambda i: True):
        with zipfile.ZipFile(self.path) as zf:
            for i, e in enumerate(self.entries):
                if wanted(i):
                    try:
                        data = zf.read(e.member)
                    except (zipfile.BadZipFile, OSError, EOFError) as exc:
                        log.warning("cannot read %s in %s: %s", e.member, self.path, exc)
                        data = b""
                    yield i, e, data


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not re.match(r"^[A-Za-z]:", name)


def _add(entries: list[Entry], seen: dict[str, Entry], entry: Entry, report: Report) -> None:
    """First occurrence of a key wins (sources are listed in sorted order, so this is deterministic)."""
    if entry.key in seen:
        where = f"{Path(entry.container).name}:{entry.member}" if entry.member else entry.container
        report.duplicates.append((entry.key, where))
        log.warning("duplicate key %s: keeping the first, ignoring %s", entry.key, where)
        return
    seen[entry.key] = entry
    entries.append(entry)


def _sample_meta(meta: dict) -> tuple[str | None, str | None]:
    """App id and name from an img2dataset sample's JSON (``save_additional_columns`` or the URL)."""
    appid = meta.get("appid")
    if appid is None and isinstance(meta.get("url"), str):
        m = _APPID_IN_URL.search(meta["url"])
        appid = m.group(1) if m else None
    name = meta.get("name")
    return (str(appid) if appid is not None else None), (str(name) if name is not None else None)


def _list_tar(path: Path, entries, seen, report) -> None:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise BannermatchError(f"cannot open archive {path}: {exc}") from None
    images: list[tarfile.TarInfo] = []
    metas: dict[str, dict] = {}
    with tar:
        try:
            for info in tar:
                suffix = PurePosixPath(info.name).suffix.lower()
                if suffix not in IMAGE_SUFFIXES and suffix != ".json":
                    continue
                if not _safe_member(info.name):
                    report.skip(info.name, "unsafe path in archive")
                elif info.issym() or info.islnk():
                    report.skip(info.name, "link in archive")
                elif not info.isfile():
                    continue
                elif suffix == ".json":
                    try:
                        metas[info.name[: -len(".json")]] = json.loads(tar.extractfile(info).read())
                    except (ValueError, UnicodeDecodeError):
                        report.skip(info.name, "unreadable sample metadata")
                else:
                    images.append(info)
        except (tarfile.TarError, OSError, EOFError) as exc:
            report.skip(str(path), f"archive truncated or corrupt after {len(images)} images ({exc})")
    for info in images:
        base = info.name.rsplit(".", 1)[0]
        appid, name = _sample_meta(metas.get(base, {}))
        key = appid or PurePosixPath(base).name
        _add(entries, seen, Entry(key, str(path), info.name, info.size, name), report)


def _list_zip(path: Path, entries, seen, report) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BannermatchError(f"cannot open archive {path}: {exc}") from None
    with zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            p = PurePosixPath(info.filename)
            if info.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not _safe_member(info.filename):
                report.skip(info.filename, "unsafe path in archive")
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                report.skip(info.filename, "link in archive")
                continue
            _add(entries, seen, Entry(p.stem, str(path), info.filename, info.file_size), report)


def _is_tar(path: Path) -> bool:
    return path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def open_source(path: str | Path) -> ImageSource:
    """List the images of a folder, a ``.tar``/``.tar.gz``/``.zip`` archive, or a folder of webdataset shards.

    Keys are Steam app ids: the file stem for folders and archives, the sample's ``appid`` metadata for
    webdataset shards. Names come from the shards' metadata or an ``apps.json`` beside the images.
    """
    from .steam import APP_NAMES_FILE, load_app_names

    path = Path(path)
    if not path.exists():
        raise BannermatchError(f"no such file or folder: {path}")
    entries: list[Entry] = []
    seen: dict[str, Entry] = {}
    report = Report()
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and _is_tar(p))
        if shards:
            downloaded = any(path.glob("*_stats.json"))  # img2dataset output: a stats file marks a finished shard
            for shard in shards:
                stem = shard.name.split(".")[0]
                if downloaded and not (path / f"{stem}_stats.json").exists():
                    report.skip(shard.name, "unfinished shard (download interrupted): run `bannermatch download` again")
                    continue
                _list_tar(shard, entries, seen, report)
            source: ImageSource = TarSource(path, entries, report)
        else:
            for p in sorted(path.rglob("*")):
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if p.is_symlink():  # may point anywhere: never followed
                    report.skip(str(p.relative_to(path)), "symbolic link")
                elif p.is_file():
                    _add(entries, seen, Entry(p.stem, str(p), "", p.stat().st_size), report)
            source = FolderSource(path, entries, report)
        names_file = path / APP_NAMES_FILE
    elif _is_tar(path):
        _list_tar(path, entries, seen, report)
        source = TarSource(path, entries, report)
        names_file = path.parent / APP_NAMES_FILE
    elif path.suffix.lower() == ".zip":
        _list_zip(path, entries, seen, report)
        source = ZipSource(path, entries, report)
        names_file = path.parent / APP_NAMES_FILE
    else:
        raise BannermatchError(f"{path} is not a folder, .tar, .tar.gz or .zip archive")
    if not entries:
        raise BannermatchError(f"no images found in {path}")
    if names_file.is_file():
        names = load_app_names(names_file)
        source.entries = [e if e.name else Entry(e.key, e.container, e.member, e.size, names.get(e.key)) for e in entries]
    return source
