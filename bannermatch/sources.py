"""Image sources: ``(key, image)`` from folders and tar/zip archives read in place, at any depth.

A source is listed once, cheaply (names, sizes and the small JSON metadata of img2dataset samples), which
gives every image a stable index and its key (the Steam app id).
Bytes are read later, only for the indices asked for, so interrupted runs can skip finished work and
DataLoader workers can split the collection without reading each other's images.

Banners are found wherever they are: loose files, archives in a folder (several parts of one snapshot),
tars inside tars (a tar of webdataset shards). A banner's key is the app id in its sample's JSON (``appid``, or
the CDN URL it was downloaded from), else its numeric file name, else its numeric folder, else, for
img2dataset's zero-padded sample numbers, the position in an ``apps.json`` list of app ids. What cannot be
placed, and archives cut short by an interrupted download, are reported in one line each; what is readable
is used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import lzma
import os
import re
import tarfile
import threading
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import BannermatchError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# The folder layout the data layer writes and this module reads
#: Written by :func:`bannermatch.snapshots.fetch_snapshot` once every file of a snapshot is complete.
SNAPSHOT_MARKER = "snapshot.json"
URL_TABLE = "banner_urls.parquet"  # a CDN download folder's URL table (:mod:`bannermatch.download`)
REPORT_FILE = "download_report.json"  # and its report
CDN_FOLDER = "cdn"  # in a collection folder: the banners fetched from the CDN beside the snapshot
COLLECTION_FILE = "collection.json"  # in a collection folder: its snapshot, and when it was last completed
#: What to do about an archive cut short: every download of ours resumes.
REDOWNLOAD = "download it again (`bannermatch download` resumes an interrupted download)"
_APPID = re.compile(r"[1-9]\d{0,11}")  # no leading zero: img2dataset's sample numbers (000012345) are not app ids
_SAMPLE_NUMBER = re.compile(r"\d+")
_APPID_IN_URL = re.compile(r"/apps/(\d+)/")
_SHARD = re.compile(r"\d+\.tar")  # an img2dataset shard; its ``_stats.json`` marks it finished
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz
_MAX_NESTING = 4  # tars inside tars: enough for any real layout, bounded for hostile ones
# What a damaged archive or a cut compressed stream raises while being read
_DAMAGE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)


@dataclass(frozen=True)
class Entry:
    """One image of a source: its key, where its bytes live, and optional metadata (game name)."""

    key: str
    container: str  # file path of the image, or of the archive holding it
    member: str  # archive member name ("" for plain files)
    size: int
    name: str | None = None
    via: tuple[str, ...] = ()  # archives nested in ``container`` on the way to ``member``
    offset: int = -1  # where the bytes start in ``container`` when nothing on the way is compressed, else -1

    @property
    def location(self) -> str:
        return ":".join([Path(self.container).name, *self.via, self.member]) if self.member else self.container


@dataclass
class Report:
    """What a run skipped, and why; saved with the features so nothing is lost silently."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key or member, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (key, ignored location)

    def skip(self, what: str, reason: str, quiet: bool = False) -> None:
        if not quiet:
            log.warning("skipped %s: %s", what, reason)
        self.skipped.append((what, reason))

    def log_summary(self) -> None:
        """One warning line per reason (with a few examples), however many items share it."""
        by_reason: dict[str, list[str]] = defaultdict(list)
        for what, reason in self.skipped:
            by_reason[reason].append(what)
        for reason, items in by_reason.items():
            if len(items) == 1:
                log.warning("skipped %s: %s", items[0], reason)
            else:
                log.warning("skipped %d items: %s (e.g. %s)", len(items), reason, ", ".join(items[:3]))
        if self.duplicates:
            log.warning("%d keys found twice: kept the first in sorted order, ignored %s", len(self.duplicates),
                        ", ".join(f"{k} at {where}" for k, where in self.duplicates[:3])
                        + (", ..." if len(self.duplicates) > 3 else ""))

    def to_dict(self) -> dict:
        return {"skipped": [list(s) for s in self.skipped], "duplicates": [list(d) for d in self.duplicates]}


class SkipImage(Exception):
    """An entry that cannot be used as an image; the message is the reason that goes in the report."""


class Unreadable(bytes):
    """No bytes, for an image whose archive could not be read; :func:`decode_image` skips it with ``reason``."""

    reason: str

    def __new__(cls, reason: str = "unreadable"):
        obj = super().__new__(cls)
        obj.reason = reason
        return obj


# --------------------------------------------------------------------------------------------- decoding

def decode_image(data: bytes, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode bytes to an RGB image: EXIF orientation applied, alpha over white, 16-bit scaled, first frame.

    ``min_size`` (height, width, after orientation) is a hint that the caller only needs that many pixels: a
    JPEG at least twice as large is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's draft mode),
    never below ``min_size``, which decodes 600x900 originals about 2x faster (BENCHMARKS.md).
    Raises :class:`SkipImage` with a short reason for anything that is not a usable image.
    """
    return prepare_image(_loaded(_opened(data, min_size)[0]))


def decode_pixels(data: bytes, min_size: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`decode_image` as a uint8 tensor ``[3, H, W]``. A plain RGB JPEG decoded at full size (most banners)
    goes through torchvision's decoder: libjpeg-turbo as in PIL, the same pixels (tested), in about half the time
    (no PIL image in between). Anything else, or anything that decoder refuses, goes through PIL."""
    img, full_size = _opened(data, min_size)
    if full_size and img.format == "JPEG" and img.mode == "RGB" and _orientation(img) == 1:
        fast = _jpeg_decoder()
        if fast is not None:
            try:  # a damaged file is a RuntimeError there; a warning only if the user's filters make one an error
                return fast(data)
            except (RuntimeError, Warning):
                pass
    return pil_to_tensor(prepare_image(_loaded(img)))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 tensor ``[3, H, W]``."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


@functools.cache
def _jpeg_decoder():
    """torchvision's JPEG decoder as ``bytes -> [3, H, W]``, or None where its image extension did not load."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        tiny = io.BytesIO()
        Image.new("RGB", (8, 8)).save(tiny, "JPEG")
        decode_jpeg(torch.frombuffer(bytearray(tiny.getvalue()), dtype=torch.uint8))
    except Exception:  # a torchvision built without libjpeg fails in several ways; PIL decodes everything anyway
        return None
    return lambda data: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


_OPENING = threading.Lock()  # images are decoded on several threads; see _opened


def _orientation(img: Image.Image) -> int:
    return img.getexif().get(ExifTags.Base.Orientation, 1)


def _opened(data: bytes, min_size: tuple[int, int] | None) -> tuple[Image.Image, bool]:
    """The image opened (its header read, nothing decoded), with the draft hint set; and whether it will be
    decoded at full size."""
    if isinstance(data, Unreadable):
        raise SkipImage(data.reason)
    if not data:
        raise SkipImage("empty file")
    with _decoding_errors():
        with _OPENING, warnings.catch_warnings():  # warnings' filters are the process's: one thread at a time
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # the size is checked as it opens
            img = Image.open(io.BytesIO(data))
        size = img.size
        if min_size is not None and img.format == "JPEG":
            height, width = min_size
            if _orientation(img) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                height, width = width, height
            img.draft(img.mode, (width, height))  # no-op unless both sides stay at least this large
    return img, img.size == size


def _loaded(img: Image.Image) -> Image.Image:
    with _decoding_errors():
        img.load()
    return img


@contextlib.contextmanager
def _decoding_errors():
    """What PIL raises for a file that is not a usable image, as :class:`SkipImage` with a short reason."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipImage(f"too large ({exc.__class__.__name__})") from None
    except UnidentifiedImageError:
        raise SkipImage("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise SkipImage(f"corrupt image ({exc})") from None


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



# --------------------------------------------------------------------------------------------- tar walking

class _TarInfo(tarfile.TarInfo):
    """Remembers on its archive how the member list ended: a zero block is a proper end; an empty, short or
    invalid header means the file was cut or damaged (tarfile takes those for a quiet end of the archive)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.bannermatch_end = exc
            raise


@dataclass
class _Cut:
    """A tar (``via`` inside its file) that ends early or damaged; members ending past ``available`` are lost."""

    via: tuple[str, ...]
    available: int
    reason: str


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _open_tar(fileobj, seekable: bool) -> tuple[tarfile.TarFile, bool]:
    """``(tar, random_access)``: an uncompressed, seekable tar is read by seeking past member data; anything
    else as a stream (a compressed file only decompresses forwards)."""
    if seekable:
        head = fileobj.read(6)
        fileobj.seek(0)
        if not head.startswith(_COMPRESSED):
            return tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_TarInfo), True
    return tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_TarInfo), False


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not re.match(r"^[A-Za-z]:", name)


def _walk(tar: tarfile.TarFile, random_access: bool, via: tuple[str, ...], base: int, available: int | None,
          descend: Callable[[tuple[str, ...]], bool], depth: int = 0):
    """Every member of ``tar`` and of the tars nested in it, depth first in archive order, as
    ``(via, info, tar, offset)`` (``offset``: of the data in the file on disk, or -1 past compression), and a
    :class:`_Cut` for every tar that ends early or damaged. ``descend(via)`` says which nested tars to open."""
    try:
        for info in tar:
            if random_access and info.isfile() and info.offset_data + info.size > available:
                continue  # its data is not all there; the next header read fails and reports the cut
            if info.isfile() and _is_tar(info.name) and _safe_member(info.name) and depth < _MAX_NESTING:
                inner_via = via + (info.name,)
                if descend(inner_via):
                    yield from _walk_nested(tar, info, random_access, inner_via, base, descend, depth)
                continue
            yield via, info, tar, base + info.offset_data if base >= 0 else -1
    except _DAMAGE as exc:
        yield _Cut(via, available if random_access else tar.fileobj.pos, _one_line(exc))
        return
    ended = getattr(tar, "bannermatch_end", None)
    if not isinstance(ended, tarfile.EOFHeaderError):
        reason = "it ends without the end-of-archive marker" if ended is None or isinstance(
            ended, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)) else _one_line(ended)
        yield _Cut(via, available if random_access else tar.fileobj.pos, reason)


def _walk_nested(tar, info, random_access, via, base, descend, depth):
    try:
        inner, inner_random_access = _open_tar(tar.extractfile(info), random_access)
    except _DAMAGE as exc:
        yield _Cut(via, 0, f"not a readable tar archive ({_one_line(exc)})")
        return
    with inner:
        inner_base = base + info.offset_data if base >= 0 and inner_random_access else -1
        yield from _walk(inner, inner_random_access, via, inner_base, info.size, descend, depth + 1)


def _walk_file(path: Path, descend=lambda via: True):
    """:func:`_walk` over a tar file on disk; raises :class:`BannermatchError` when it is not a tar at all."""
    with open(path, "rb") as f:
        try:
            tar, random_access = _open_tar(f, True)
        except _DAMAGE as exc:
            raise BannermatchError(f"{path} is not a readable tar archive ({_one_line(exc)}): it is damaged or "
                                   f"not a tar; {REDOWNLOAD}") from None
        with tar:
            yield from _walk(tar, random_access, (), 0 if random_access else -1,
                             os.fstat(f.fileno()).st_size, descend)


# --------------------------------------------------------------------------------------------- sources

class ImageSource:
    """A listed collection of images. Build one with :func:`open_source`."""

    def __init__(self, path: Path, entries: list[Entry], report: Report, sampled: int = 0):
        self.path = path
        self.entries = entries
        self.report = report  # problems found while listing (damaged archives, unsafe members, duplicates)
        self.sampled = sampled  # a sample of the collection at ``path`` (of this many banners), 0: the collection

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def names(self) -> dict[str, str]:
        return {e.key: e.name for e in self.entries if e.name}

    def sample(self, n: int, seed: int = 0, include: Iterable[str] = ()) -> ImageSource:
        """``n`` banners chosen by app id, kept in listing order, always with the keys of ``include`` that the
        collection holds, to try a setting quickly: the rest are those whose key has the smallest sha256 (with
        ``seed``). So the same ``n`` (and ``include``) gives the same sample in every command and notebook cell,
        and adding m of N games changes only about n*m/N of it."""
        if n >= len(self.entries):
            return self
        wanted = set(include)
        kept = [i for i, e in enumerate(self.entries) if e.key in wanted][:n]
        rest = sorted((i for i, e in enumerate(self.entries) if e.key not in wanted),
                      key=lambda i: hashlib.sha256(f"{seed}:{self.entries[i].key}".encode()).digest())
        picked = sorted(kept + rest[:n - len(kept)])
        return ImageSource(self.path, [self.entries[i] for i in picked], self.report, sampled=len(self.entries))

    def read(self, wanted: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, Entry, bytes]]:
        """Yield ``(index, entry, bytes)`` once for every wanted index, grouped by file.

        Never raises for a damaged or vanished file: what cannot be read comes as :class:`Unreadable` bytes,
        which :func:`decode_image` turns into a skip with the reason.
        """
        by_container: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(self.entries):
            if wanted(i):
                by_container[e.container].append(i)
        for container, indices in by_container.items():
            if not self.entries[indices[0]].member:
                yield from self._read_files(indices)
            elif container.lower().endswith(".zip"):
                yield from self._read_zip(container, indices)
            else:
                direct = [i for i in indices if self.entries[i].offset >= 0]
                streamed = [i for i in indices if self.entries[i].offset < 0]
                yield from self._read_at_offsets(container, direct)
                yield from self._read_tar_stream(container, streamed)

    def _read_files(self, indices):
        for i in indices:
            e = self.entries[i]
            try:
                data = Path(e.container).read_bytes()
            except OSError as exc:
                data = Unreadable(f"cannot read {e.container}: {_one_line(exc)}")
            yield i, e, data

    def _read_zip(self, container, indices):
        try:
            zf = zipfile.ZipFile(container)
        except _DAMAGE as exc:
            yield from self._unreadable(indices, f"cannot open {container}: {_one_line(exc)}; {REDOWNLOAD}")
            return
        with zf:
            for i in indices:
                try:
                    data = zf.read(self.entries[i].member)
                except (*_DAMAGE, KeyError) as exc:
                    data = Unreadable(f"cannot read it in {container}: {_one_line(exc)}; {REDOWNLOAD}")
                yield i, self.entries[i], data

    def _read_at_offsets(self, container, indices):
        """Uncompressed tars, nested or not: a seek and a read per image, in file order."""
        if not indices:
            return
        try:
            f = open(container, "rb")
        except OSError as exc:
            yield from self._unreadable(indices, f"cannot read {container}: {_one_line(exc)}")
            return
        with f:
            for i in sorted(indices, key=lambda i: self.entries[i].offset):
                e = self.entries[i]
                try:
                    f.seek(e.offset)
                    data = f.read(e.size)
                except OSError as exc:
                    data = Unreadable(f"cannot read {container}: {_one_line(exc)}")
                if len(data) != e.size:
                    data = Unreadable(f"{container} is shorter than when it was listed; {REDOWNLOAD}")
                yield i, e, data

    def _read_tar_stream(self, container, indices):
        """Compressed tars: one pass in archive order, reading only the wanted members' data."""
        if not indices:
            return
        todo = {(self.entries[i].via, self.entries[i].member): i for i in indices}
        vias = {e.via[:n] for e in (self.entries[i] for i in indices) for n in range(1, len(e.via) + 1)}
        reason = f"not found in {container} any more"
        try:
            for item in _walk_file(Path(container), vias.__contains__):
                if isinstance(item, _Cut):
                    reason = _cut_message(container, item)
                    continue
                via, info, tar, _ = item
                i = todo.pop((via, info.name), None)
                if i is None:
                    continue
                try:
                    data = tar.extractfile(info).read()
                except _DAMAGE as exc:
                    data = Unreadable(_cut_message(container, _Cut(via, 0, _one_line(exc))))
                yield i, self.entries[i], data
                if not todo:
                    return
        except BannermatchError as exc:
            reason = str(exc)
        yield from self._unreadable(todo.values(), reason)

    def _unreadable(self, indices, reason):
        for i in indices:
            yield i, self.entries[i], Unreadable(reason)

    def __iter__(self) -> Iterator[tuple[str, Image.Image]]:
        """``(key, RGB image)`` for every usable image; unusable ones are logged and reported."""
        for _, entry, data in self.read():
            try:
                yield entry.key, decode_image(data)
            except SkipImage as exc:
                self.report.skip(entry.key, str(exc))


def _cut_message(container: str | Path, cut: _Cut, kept: int | None = None) -> str:
    where = ":".join([str(container), *cut.via])
    using = "" if kept is None else f"using the {kept} images before the damage; "
    return f"{where} is cut short or damaged ({cut.reason}): {using}{REDOWNLOAD}"


# --------------------------------------------------------------------------------------------- listing

@dataclass
class _Found:
    """An image found while listing, before its key is settled."""

    container: str
    member: str
    size: int
    via: tuple[str, ...] = ()
    offset: int = -1
    appid: str | None = None  # from the sample's JSON
    name: str | None = None

    @property
    def path(self) -> PurePosixPath:
        return PurePosixPath(self.member) if self.member else PurePosixPath(Path(self.container).as_posix())

    def sort_key(self) -> tuple:
        return (Path(self.container).parts, *(PurePosixPath(v).parts for v in self.via), PurePosixPath(self.member).parts)


class _Listing:
    def __init__(self, report: Report):
        self.found: list[_Found] = []
        self.report = report
        self.problems: list[str] = []  # damaged archives, unfinished shards: the lines that matter most

    def tar(self, path: Path) -> None:
        images: list[tuple[_Found, tarfile.TarInfo]] = []
        metas: dict[tuple, dict] = {}
        cuts: list[_Cut] = []
        for item in _walk_file(path):
            if isinstance(item, _Cut):
                cuts.append(item)
                continue
            via, info, tar, offset = item
            name = info.name
            suffix = PurePosixPath(name).suffix.lower()
            if suffix not in IMAGE_SUFFIXES and suffix != ".json":
                continue
            where = ":".join([*via, name])
            if not _safe_member(name):
                self.report.skip(where, "unsafe path in archive", quiet=True)
            elif info.issym() or info.islnk():
                self.report.skip(where, "link in archive", quiet=True)
            elif not info.isfile():
                continue
            elif suffix == ".json":
                try:
                    metas[(via, name[: -len(".json")])] = json.loads(tar.extractfile(info).read())
                except (ValueError, UnicodeDecodeError, *_DAMAGE):
                    pass  # optional metadata: the image is still placed by its name
            else:
                images.append((_Found(str(path), name, info.size, via, offset), info))
        for cut in cuts:  # members whose data runs past the cut are lost
            images = [(f, info) for f, info in images
                      if f.via != cut.via or info.offset_data + info.size <= cut.available]
        for cut in cuts:
            kept = sum(f.via[:len(cut.via)] == cut.via for f, _ in images)
            self.problems.append(_cut_message(path, cut, kept))
        for found, _ in images:
            meta = metas.get((found.via, found.member.rsplit(".", 1)[0]))
            if isinstance(meta, dict):
                found.appid, found.name = _sample_meta(meta)
            self.found.append(found)

    def zip(self, path: Path) -> None:
        try:
            zf = zipfile.ZipFile(path)
        except _DAMAGE as exc:
            raise BannermatchError(f"{path} is not a readable zip archive ({_one_line(exc)}): it is damaged or "
                                   f"not a zip; {REDOWNLOAD}") from None
        with zf:
            for info in zf.infolist():
                p = PurePosixPath(info.filename)
                if info.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if not _safe_member(info.filename):
                    self.report.skip(info.filename, "unsafe path in archive", quiet=True)
                elif (info.external_attr >> 16) & 0o170000 == 0o120000:
                    self.report.skip(info.filename, "link in archive", quiet=True)
                else:
                    self.found.append(_Found(str(path), info.filename, info.file_size))

    def folder(self, root: Path) -> None:
        files = []
        for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are listed, never entered
            files += [Path(dirpath) / n for n in filenames]
        unfinished = []
        for p in sorted(files):
            lower = p.name.lower()
            wanted = p.suffix.lower() in IMAGE_SUFFIXES or _is_tar(lower) or lower.endswith(".zip")
            if p.is_symlink():  # may point anywhere: never followed
                if wanted:
                    self.report.skip(str(p.relative_to(root)), "symbolic link", quiet=True)
            elif wanted and not p.is_file():  # a FIFO or a device would block the read forever
                self.report.skip(str(p.relative_to(root)), "not a regular file", quiet=True)
            elif p.suffix.lower() in IMAGE_SUFFIXES:
                self.found.append(_Found(str(p), "", p.stat().st_size))
            elif _SHARD.fullmatch(lower) and _is_download(p.parent) \
                    and not (p.parent / f"{p.name[:-4]}_stats.json").exists():
                unfinished.append(p)  # img2dataset writes a shard's stats file last
            elif _is_tar(lower) or lower.endswith(".zip"):
                try:
                    self.tar(p) if _is_tar(lower) else self.zip(p)
                except BannermatchError as exc:  # one unreadable part: the others are still used
                    self.problems.append(str(exc))
        if unfinished:
            names = ", ".join(str(p.relative_to(root)) for p in unfinished[:3]) + (", ..." if len(unfinished) > 3 else "")
            self.problems.append(f"{root}: {len(unfinished)} unfinished shard{'s' if len(unfinished) > 1 else ''} "
                                 f"({names}): the download was interrupted; run `bannermatch download {root}` "
                                 "again to resume")


def _is_download(folder: Path) -> bool:
    """A folder written by `bannermatch download` (img2dataset): its shards are finished only with a stats file."""
    return (folder / URL_TABLE).exists() or (folder / REPORT_FILE).exists() or any(folder.glob("*_stats.json"))


def _sample_meta(meta: dict) -> tuple[str | None, str | None]:
    """App id and name from an img2dataset sample's JSON (``save_additional_columns`` or the URL)."""
    appid = meta.get("appid")
    if appid is None and isinstance(meta.get("url"), str):
        m = _APPID_IN_URL.search(meta["url"])
        appid = m.group(1) if m else None
    name = meta.get("name")
    return (str(appid) if appid is not None else None), (str(name) if isinstance(name, str) and name else None)


def _read_names(path: Path) -> tuple[dict[str, str], list[str]]:
    """``apps.json``: ``{appid: name}`` (or a GetAppList answer) gives names; a bare list of app ids (how the
    2023 snapshot was made) gives the app id of img2dataset's sample number n, ``ids[n]``."""
    from .steam import parse_app_list

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list) and all(isinstance(a, int) or (isinstance(a, str) and a.isdigit()) for a in data):
            return {}, [str(int(a)) for a in data]
        return parse_app_list(data), []
    except (OSError, ValueError, UnicodeDecodeError, BannermatchError) as exc:
        log.warning("ignoring %s (names will be missing): %s", path, _one_line(exc))
        return {}, []


def _settle_keys(found: list[_Found], ids_by_number: list[str], names: dict[str, str],
                 report: Report) -> list[Entry]:
    """Give every image its key; a key found twice keeps the first location in sorted order."""
    placed: dict[str, tuple[tuple, _Found]] = {}
    order: list[str] = []
    for f in found:
        stem, parent = f.path.stem, f.path.parent.name
        key = f.appid if f.appid and _APPID.fullmatch(f.appid) else None
        if key is None and _APPID.fullmatch(stem):
            key = stem
        if key is None and _APPID.fullmatch(parent):
            key = parent  # the CDN's layout: apps/{appid}/library_600x900.jpg
        if key is None and _SAMPLE_NUMBER.fullmatch(stem) and int(stem) < len(ids_by_number):
            key = ids_by_number[int(stem)]
        where = Entry("", f.container, f.member, f.size, via=f.via).location
        if key is None:
            report.skip(where, "no app id in its name, folder or metadata", quiet=True)
            continue
        sort_key = f.sort_key()
        if key not in placed:
            order.append(key)
            placed[key] = (sort_key, f)
            continue
        kept_key, kept = placed[key]
        if sort_key < kept_key:
            placed[key] = (sort_key, f)
            where = Entry("", kept.container, kept.member, kept.size, via=kept.via).location
        report.duplicates.append((key, where))
    entries = []
    for key in order:
        f = placed[key][1]
        entries.append(Entry(key, f.container, f.member, f.size, f.name or names.get(key), f.via, f.offset))
    return entries


def open_source(path: str | Path) -> ImageSource:
    """List the images of a folder (any depth; archives in it included) or of a ``.tar``/``.tar.gz``/``.zip``
    archive (tars inside it included), read in place.

    Keys are Steam app ids (see the module's docstring for where they come from). Names come from the samples'
    metadata or an ``apps.json`` beside the images. Damaged archives and unfinished shards are reported in one
    warning line each and their readable images used; with nothing usable, one :class:`BannermatchError`.
    """
    from .steam import APP_NAMES_FILE

    path = Path(path)
    if not path.exists():
        raise BannermatchError(f"no such file or folder: {path}")
    if not (path.is_dir() or path.is_file()):  # a FIFO or a device: reading it would block
        raise BannermatchError(f"{path} is not a folder nor a regular file")
    if path.is_dir() and (index := index_collection(path)) is not None:
        return index.source()
    report = Report()
    listing = _Listing(report)
    if path.is_dir():
        listing.folder(path)
        root = path
    elif _is_tar(path.name):
        listing.tar(path)
        root = path.parent
    elif path.suffix.lower() == ".zip":
        listing.zip(path)
        root = path.parent
    else:
        raise BannermatchError(f"{path} is not a folder, .tar, .tar.gz or .zip archive")
    names, ids_by_number = _read_names(root / APP_NAMES_FILE) if (root / APP_NAMES_FILE).is_file() else ({}, [])
    entries = _settle_keys(listing.found, ids_by_number, names, report)
    problems = listing.problems + _missing_snapshot_files(root)
    if not entries:
        if problems:
            raise BannermatchError(problems[0])
        unplaced = [what for what, reason in report.skipped if reason.startswith("no app id")]
        if unplaced:
            raise BannermatchError(f"no banner in {path} has an app id: {len(unplaced)} images named like "
                                   f"{', '.join(unplaced[:3])}; name them by app id (227300.jpg)")
        raise BannermatchError(f"no images found in {path}")
    report.log_summary()
    for problem in problems:  # logged apart from the per-image skips: one line each
        log.warning("%s", problem)
        report.skipped.append((str(path), problem))
    return ImageSource(path, _named(entries), report)


def _named(entries: list[Entry]) -> list[Entry]:
    """Banners without a name in their own metadata get the one of the app list shipped with the package."""
    from .steam import shipped_app_names

    if all(e.name for e in entries):
        return entries
    shipped = shipped_app_names()
    return [e if e.name or e.key not in shipped else replace(e, name=shipped[e.key]) for e in entries]


# --------------------------------------------------------------------------------------------- the collection

@dataclass
class CollectionIndex:
    """A collection folder's parts (a snapshot, the CDN top-up, folders of the user's own) behind one index:
    app id -> the banner used and the part it came from, in app-id order, so that adding games never shifts
    the others. Which part wins an app id held twice: the newest snapshot, then the CDN top-up, then the
    user's folders by name. Every such conflict is recorded (and logged); snapshots other than the one the
    collection was made from (``collection.json``) are left out with one line each, never mixed in."""

    folder: Path
    parts: list[Path]  # in precedence order
    entries: dict[str, Entry]  # app id -> its banner, in app-id order
    part_of: dict[str, str]  # app id -> the name of the part its banner comes from
    conflicts: list[tuple[str, str, str]]  # (app id, part kept, location left out)
    left_out: list[tuple[str, str]]  # (part, why)
    report: Report

    def source(self) -> ImageSource:
        return ImageSource(self.folder, list(self.entries.values()), self.report)


def index_collection(folder: str | Path) -> CollectionIndex | None:
    """The index of a collection folder (see :class:`CollectionIndex`); None when ``folder`` is no collection:
    images or archives lie in it, or no subfolder carries an app list or a snapshot marker."""
    from .steam import APP_NAMES_FILE

    folder = Path(folder)
    if any(p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or _is_tar(p.name) or p.suffix.lower() == ".zip")
           for p in folder.iterdir()):
        return None
    parts = [p for p in folder.iterdir()
             if p.is_dir() and ((p / APP_NAMES_FILE).is_file() or (p / SNAPSHOT_MARKER).is_file())]
    if not parts:
        return None
    report, left_out = Report(), []
    record = collection_record(folder)
    if record is not None:  # the collection was made from one snapshot (None: the CDN alone)
        chosen = record.get("snapshot")
        for part in [p for p in parts if _marker(p) is not None and _marker(p).get("name") != chosen]:
            why = (f"the collection in {folder} was made from " + (f"the {chosen} snapshot" if chosen else "the CDN alone")
                   + f" ({COLLECTION_FILE}); embed {part} on its own to use its banners")
            log.warning("left out %s: %s", part, why)
            left_out.append((str(part), why))
            parts.remove(part)
    parts.sort(key=_precedence)
    entries: dict[str, Entry] = {}
    part_of: dict[str, str] = {}
    conflicts = []
    for part in parts:
        try:
            source = open_source(part)
        except BannermatchError as exc:  # an empty or unusable part: the others are the collection
            log.warning("%s", exc)
            report.skipped.append((str(part), str(exc)))
            continue
        report.skipped += source.report.skipped
        report.duplicates += source.report.duplicates
        for e in source.entries:
            if e.key in entries:
                conflicts.append((e.key, part_of[e.key], e.location))
                log.debug("app %s is in %s and %s: kept the banner of %s", e.key, part_of[e.key], part.name,
                          part_of[e.key])
            else:
                entries[e.key] = e
                part_of[e.key] = part.name
    if not entries:
        raise BannermatchError(f"no images found in {folder}")
    if conflicts:
        kept = Counter(kept for _, kept, _ in conflicts)
        log.warning("%d app ids are in several parts of %s: kept the banners of %s (newest snapshot first, then the "
                    "CDN's, then your own folders'); e.g. %s", len(conflicts), folder,
                    ", ".join(f"{part} ({n})" for part, n in kept.items()),
                    ", ".join(f"{key} at {where}" for key, _, where in conflicts[:3]))
        report.duplicates += [(key, where) for key, _, where in conflicts]
    order = sorted(entries, key=int)
    return CollectionIndex(folder, parts, {k: entries[k] for k in order}, {k: part_of[k] for k in order},
                           conflicts, left_out, report)


def _marker(part: Path) -> dict | None:
    try:
        marker = json.loads((part / SNAPSHOT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _precedence(part: Path) -> tuple:
    """Sort key of a collection's parts: snapshots newest first, then the CDN top-up, then the user's folders."""
    marker = _marker(part)
    if marker is not None:
        return 0, -int(marker.get("year") or 0), part.name
    return (1 if part.name == CDN_FOLDER else 2), 0, part.name


def collection_record(folder: Path) -> dict | None:
    """``collection.json``: the snapshot the collection is made from (``snapshot``, None for the CDN alone) and
    when the games added since were last fetched (``completed``); None without a readable record (a folder
    :func:`~bannermatch.collection.get_banners` did not make: every part is used)."""
    try:
        record = json.loads((folder / COLLECTION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _missing_snapshot_files(root: Path) -> list[str]:
    marker = root / SNAPSHOT_MARKER
    if not marker.is_file():
        return []
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        missing = [f for f in info["files"] if not (root / Path(f).name).is_file()]
        name = str(info["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{marker} is damaged: run `bannermatch download --snapshot NAME {root}` again"]
    if not missing:
        return []
    return [f"{root} lacks {', '.join(missing)} of the {name} snapshot: "
            f"run `bannermatch download --snapshot {name} {root}` again"]


def archive_has_images(path: str | Path, limit: int = 10_000) -> bool:
    """Whether a tar holds an image among its first ``limit`` members, nested tars included: a cheap check of a
    download (the full listing comes with ``open_source``). Raises :class:`BannermatchError` for a non-tar."""
    for n, item in enumerate(_walk_file(Path(path))):
        if n >= limit:
            break
        if not isinstance(item, _Cut) and item[1].isfile() and PurePosixPath(item[1].name).suffix.lower() in IMAGE_SUFFIXES:
            return True
    return False
