"""Published banner snapshots: whole collections in a few archives, a quicker first run than the Steam CDN.

Each is fetched once (resuming over HTTP Range, size- and structure-checked, cached) into a folder that
:func:`bannermatch.sources.open_source` reads in place: ``bannermatch download --snapshot NAME DIR`` then
``bannermatch embed DIR``. Tests and mirrors: ``BANNERMATCH_SNAPSHOT_MIRROR=http://host:port`` (or ``mirror=``)
serves the same paths from another host.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .errors import BannermatchError
from .fetch import fetch_archive
from .files import atomic_write
from .sources import SNAPSHOT_MARKER, archive_has_images

log = logging.getLogger(__name__)

MIRROR_ENV = "BANNERMATCH_SNAPSHOT_MIRROR"


class SnapshotUnavailable(BannermatchError):
    """A snapshot could not be fetched (no network, gone, cut short, not an archive); callers may fall back to
    the CDN, saying so in one line."""


@dataclass(frozen=True)
class Snapshot:
    name: str
    urls: tuple[str, ...]
    description: str
    year: int
    width: int  # banner size in the archives, px
    height: int
    geometry: str  # "keep_ratio": the 2:3 shape kept; "square": squashed to a square (nothing to keep)

    @property
    def files(self) -> list[str]:
        return [Path(urllib.parse.urlparse(u).path).name for u in self.urls]

    def check_preprocess(self, preprocess: str) -> None:
        """``keep`` preserves the 2:3 banner shape, which a squashed snapshot no longer has: refuse it in one line."""
        if preprocess == "keep" and self.geometry == "square":
            raise BannermatchError(f"the {self.name} snapshot holds banners squashed to {self.width}x{self.height}: "
                                   "their 2:3 shape is gone, so --preprocess keep cannot keep it; use crop or squash")


_GITHUB = "https://github.com/woctezuma"
SNAPSHOTS: dict[str, Snapshot] = {s.name: s for s in (
    Snapshot("dinov2-2023", (f"{_GITHUB}/steam-DINOv2/releases/download/input/images_partA.tar.gz",
                             f"{_GITHUB}/steam-DINOv2/releases/download/input/images_partB.tar.gz",
                             f"{_GITHUB}/steam-DINOv2/releases/download/input/apps.json"),
             "vertical banners of July 2023, img2dataset keep_ratio, in two parts plus the app id list",
             2023, 224, 336, "keep_ratio"),
    Snapshot("dino-2021", (f"{_GITHUB}/steam-DINO/releases/download/input/resized_vertical_steam_banners_v2.tar.gz",),
             "the 29,982 games with a vertical banner in 2021, squashed to 224x224", 2021, 224, 224, "square"),
    Snapshot("bit-2021", (f"{_GITHUB}/steam-BiT/releases/download/v0.1-data/steam_webdataset.tar",),
             "vertical banners of 2021 as img2dataset webdataset shards in one tar, 256 px keep_ratio",
             2021, 256, 384, "keep_ratio"),
)}
#: The default for a first run: the most recent collection.
NEWEST = max(SNAPSHOTS.values(), key=lambda s: s.year).name


def get_snapshot(name: str) -> Snapshot:
    try:
        return SNAPSHOTS[name]
    except KeyError:
        raise BannermatchError(f"unknown snapshot {name!r}; choose one of {', '.join(SNAPSHOTS)}") from None


def snapshot_in(path: str | Path) -> Snapshot | None:
    """The snapshot a folder (or an archive in it) was fetched as, from the marker :func:`fetch_snapshot` leaves."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        return SNAPSHOTS.get(json.loads((folder / SNAPSHOT_MARKER).read_text(encoding="utf-8"))["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mirrored(url: str, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}{urllib.parse.urlparse(url).path}" if mirror else url


def _cached(snapshot: Snapshot, dest: Path) -> list[Path] | None:
    """The files, when a complete earlier fetch left them (and their marker) in ``dest``: no request at all."""
    try:
        marker = json.loads((dest / SNAPSHOT_MARKER).read_text(encoding="utf-8"))
        sizes = marker["sizes"]
        paths = [dest / f for f in snapshot.files]
        if marker["name"] == snapshot.name and all(p.is_file() and p.stat().st_size == sizes[p.name] for p in paths):
            return paths
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _check(path: Path) -> None:
    """A fetched file is what it should be: JSON parses, an archive holds images (corrupt ones are deleted)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
            return
        if archive_has_images(path):
            return
        problem = "holds no images"
    except (ValueError, UnicodeDecodeError, BannermatchError) as exc:
        problem = f"is damaged ({str(exc).splitlines()[0][:200]})"
    path.unlink(missing_ok=True)  # so that the next run downloads it again
    raise BannermatchError(f"the downloaded {path.name} {problem}; deleted it, run again to download it anew")


def fetch_snapshot(name: str, dest: str | Path, *, mirror: str | None = None, timeout: float = 30,
                   attempts: int = 5, progress: bool = True) -> list[Path]:
    """Download snapshot ``name`` into ``dest`` (resumable, size- and structure-checked) and return its files.

    A second call finds them complete and makes no request. ``mirror`` (default: ``$BANNERMATCH_SNAPSHOT_MIRROR``)
    replaces the host. Raises :class:`SnapshotUnavailable` when it cannot be had.
    """
    snapshot = get_snapshot(name)
    dest = Path(dest)
    cached = _cached(snapshot, dest)
    if cached:
        log.info("the %s snapshot is already in %s", name, dest)
        return cached
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    paths = []
    for url in snapshot.urls:
        try:
            path = fetch_archive(_mirrored(url, mirror), dest, timeout=timeout, attempts=attempts, progress=progress)
            _check(path)
        except BannermatchError as exc:  # unreachable, gone, cut short, damaged: the caller may use the CDN
            raise SnapshotUnavailable(f"the {name} snapshot is unavailable: {exc}") from None
        paths.append(path)
    marker = {"name": name, "year": snapshot.year, "files": snapshot.files, "sizes": {p.name: p.stat().st_size for p in paths},
              "urls": list(snapshot.urls), "description": snapshot.description}
    atomic_write(dest / SNAPSHOT_MARKER, lambda fh: fh.write(json.dumps(marker, indent=1).encode("utf-8")))
    return paths
