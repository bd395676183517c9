"""Fetching one large file over HTTP(S): resumable with Range requests, checked against the server's size.

Published snapshots and the earlier archive release come this way; the CDN's banners do not (see ``download``).
"""

from __future__ import annotations

import http.client
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import BannermatchError
from .steam import NetworkUnreachable

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def fetch_archive(url_or_path, dest_dir, *, timeout: float = 30, attempts: int = 5, progress: bool = True) -> Path:
    """The earlier release (``resized_vertical_steam_banners_v2.tar.gz``, 224x224 banners): a local path is used
    in place; a URL is downloaded into ``dest_dir``, resuming a ``.part`` file with HTTP Range requests, checked
    against the server's size and renamed only when complete. ``open_source`` reads it without extracting.
    """
    text = str(url_or_path)
    if urllib.parse.urlparse(text).scheme not in ("http", "https"):
        path = Path(text)
        if not path.is_file():
            raise BannermatchError(f"archive not found: {path}")
        return path
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)).name  # a bare file name: no traversal
    if name in ("", ".", ".."):
        raise BannermatchError(f"cannot tell the archive's file name from {text}")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name
    if dest.is_file():
        log.info("%s is already downloaded", dest)
        return dest
    part = dest.with_name(name + ".part")
    size = total = None
    for attempt in range(attempts):
        try:
            total = _transfer(text, part, timeout, progress)
        except (OSError, http.client.HTTPException) as exc:  # connection cut or stalled mid-transfer: resume
            if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
                raise NetworkUnreachable(text, exc) from None
            log.warning("transfer of %s interrupted (%s); resuming", name, exc)
            continue
        size = part.stat().st_size if part.exists() else 0
        if total is None or size == total:
            part.replace(dest)
            return dest
        if size > total:  # not the file the server has now: start over
            part.unlink()
        log.warning("transfer of %s stopped at %d of %d bytes; resuming", name, size, total)
    raise BannermatchError(f"download of {text} incomplete after {attempts} attempts"
                           + (f" ({size} of {total} bytes)" if total else "") + "; run again to resume")


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> int | None:
    """Append what the server has beyond ``part``'s size (or restart); return the file's full size if known."""
    from tqdm.auto import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "bannermatch"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        total = _content_range_total(exc.headers.get("Content-Range"))
        if exc.code == 416 and have and total is not None:  # nothing beyond what we have: complete, or too long
            return total
        raise BannermatchError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    with response:
        resumed = have and response.status == 206
        if resumed:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != have:
                part.unlink()
                raise http.client.HTTPException("unexpected Content-Range; restarting")
            total = int(m.group(2)) if m.group(2) != "*" else None
        else:  # a full body (no Range sent, or the server ignores Range)
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=not progress) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _content_range_total(value: str | None) -> int | None:
    m = re.search(r"/(\d+)$", value or "")
    return int(m.group(1)) if m else None


