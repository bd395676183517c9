"""The banner collection, the fast way: a published snapshot read in place, then the Steam CDN for what it lacks.

:func:`get_banners` fills a collection folder (``bannermatch run`` and the notebooks' data cell);
:func:`bannermatch.sources.index_collection` reads it back as one collection.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .defaults import DEFAULT_IMAGES
from .download import download_banners, requested_apps
from .errors import BannermatchError
from .files import atomic_write
from .snapshots import NEWEST, SNAPSHOTS, SnapshotUnavailable, fetch_snapshot
from .sources import CDN_FOLDER, COLLECTION_FILE, TAR_SUFFIXES, URL_TABLE, collection_record, open_source
from .steam import STEAM_CDN, fetch_app_list

log = logging.getLogger(__name__)


def get_banners(folder=None, snapshot: str | None = "newest", update: bool = False, host: str = STEAM_CDN,
                app_list=None, mirror: str | None = None, progress: bool = True) -> Path:
    """The banner collection in ``folder``, the fast way: a published snapshot (``newest`` by default; None for
    the CDN alone) in a few archives, read in place, then the Steam CDN for what the snapshot lacks.

    On the first run, and with ``update``, the CDN part asks Steam for its current list and requests only the
    apps added since the snapshot (app ids above its highest; or the apps of ``app_list`` it lacks), so a first
    run makes no 200k requests; afterwards it is a no-op. A snapshot that cannot be had falls back to the CDN
    alone (resumable, a no-op once complete); a Steam that cannot be reached after a snapshot leaves the snapshot
    alone until the next run; each says so in one line. ``collection.json`` records which snapshot the
    collection is made from: another one asked for later replaces it in the collection, never joins it.
    A folder of banners it did not make, or an archive, is used as it is (a folder that
    :func:`~bannermatch.download.download_banners` made is resumed). Returns ``folder``, which
    :func:`~bannermatch.sources.open_source` reads as one collection.
    """
    folder = Path(folder or DEFAULT_IMAGES)
    if folder.is_file():
        return folder  # an archive of the user's own, read in place
    if folder.name.lower().endswith((*TAR_SUFFIXES, ".zip")):
        raise BannermatchError(f"no such archive: {folder}")
    if (folder / URL_TABLE).exists():  # a CDN download folder of its own: resumed (a no-op once complete)
        print(download_banners(folder, app_list, host=host, update=update, progress=progress).summary())
        return folder
    if folder.is_dir() and any(folder.iterdir()) and not _collection_made_here(folder):
        return folder  # banners of the user's own: used as they are
    cdn = folder / CDN_FOLDER
    snapshot = NEWEST if snapshot == "newest" else snapshot
    if snapshot:
        try:
            fetch_snapshot(snapshot, folder / snapshot, mirror=mirror, progress=progress)
        except SnapshotUnavailable as exc:
            log.warning("%s; downloading the banners from the Steam CDN instead", exc)
            snapshot = None
    if snapshot is None:
        print(download_banners(cdn, app_list, host=host, update=update, progress=progress).summary())
        _record(folder, {"snapshot": None, "completed": time.time()})
        return folder
    record = collection_record(folder) or {}
    if not update and record.get("snapshot") == snapshot and record.get("completed"):
        return folder  # the snapshot and what was new then: complete
    have = set(open_source(folder / snapshot).keys)
    try:
        listed = requested_apps(app_list, None, fetch_app_list)
    except BannermatchError as exc:  # offline, or Steam unreachable: the snapshot is a collection of its own
        log.warning("the games added since the %s snapshot could not be listed (%s); using the snapshot alone",
                    snapshot, str(exc).splitlines()[0])
        if record.get("snapshot") != snapshot:  # the collection is this snapshot's now, completed on a later run
            _record(folder, {"snapshot": snapshot, "completed": None})
        return folder
    newest = max(map(int, have), default=0)
    added = {a: n for a, n in listed.items() if a not in have and (app_list is not None or int(a) > newest)}
    if added:
        print(download_banners(cdn, added, host=host, update=True, have=have, progress=progress).summary())
    else:
        log.info("no game was added since the %s snapshot", snapshot)
    _record(folder, {"snapshot": snapshot, "listed": len(listed), "added": len(added), "completed": time.time()})
    return folder


def _record(folder: Path, record: dict) -> None:
    atomic_write(folder / COLLECTION_FILE, lambda fh: fh.write(json.dumps(record).encode()))


def _collection_made_here(folder: Path) -> bool:
    return (folder / COLLECTION_FILE).exists() or any((folder / part).is_dir() for part in [CDN_FOLDER, *SNAPSHOTS])
