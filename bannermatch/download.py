"""Download Steam's vertical banners from the CDN as webdataset shards.

Two engines write the same folder, so either can resume or update what the other started:

- ``"light"`` (the default): ``requests`` and Pillow in this process, a thread pool with one connection pool
  per thread. Colab has both, so nothing is installed or downgraded.
- ``"img2dataset"``: img2dataset's downloader and its distributors (``multiprocessing``, ``pyspark``, ``ray``),
  for clusters; ``pip install bannermatch[img2dataset]``.

``download_banners`` writes, in its output folder:

- ``banner_urls.parquet``: the URL table (url, appid, name; appid a string); shard ``n`` holds its rows
  ``n*SAMPLES_PER_SHARD`` onwards. An update appends rows after blank ones that fill the last shard, so new banners
  always go into new shards;
- ``00000.tar`` ...: webdataset shards, ``{key}.jpg`` (256 px on the short side, 2:3 kept) + ``{key}.json``
  (which holds ``appid``, ``name`` and ``url``), readable in place by :func:`bannermatch.sources.open_source`;
- ``00000.parquet`` / ``00000_stats.json``: a shard's status table (one row per app: status, error_message) and
  counts, written after the tar; the stats file marks the shard finished;
- ``apps.json``: every requested app's name, so later steps show names offline;
- ``download_state.json``: each app id whose last check was a 404 or a failure, with the reason and the time;
- ``download_report.json``: the :class:`DownloadReport`.

Reruns resume: every shard whose ``_stats.json`` exists is skipped; an unfinished shard is downloaded again whole.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import io
import json
import logging
import math
import os
import random
import re
import signal
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BannermatchError
from .files import atomic_write
from .sources import REPORT_FILE, URL_TABLE, SkipImage, decode_image
from .steam import (APP_NAMES_FILE, STEAM_CDN, NetworkUnreachable, banner_url, fetch_app_list, load_app_names,
                    parse_app_list, save_app_names, shipped_app_names)

log = logging.getLogger(__name__)

STATE_FILE = "download_state.json"
IMAGE_SIZE = 256  # short side: 300x450 banners become 256x384
SAMPLES_PER_SHARD = 1000  # the unit of resumption: ~30 shards for the 30k games with a vertical banner
DEFAULT_THREADS = 32  # downloads wait on the network, so many threads per core
DEFAULT_RECHECK_DAYS = 30
ENGINES = ("light", "img2dataset")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
_SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shards are named 00000.tar, 00000_stats.json, ...
_NOT_FOUND = "HTTP Error 404"  # how both engines record a 404: the game has no vertical banner
_DECODE_ERROR = "Image decoding error"  # img2dataset's reason for bytes that are no image; the light engine's too
_OPEN_SHARDS = 3  # light engine: shards downloaded at once; bounds the banners held in memory before a shard is written
_MAX_BANNER_BYTES = 20 << 20  # a banner is ~100 kB: anything this big is not one
_ATTEMPT_TIMEOUTS = 3  # light engine: an attempt ends after 3 x timeout in all, even while bytes trickle in
_BACKOFF = 0.5  # seconds before the first retry, doubled for each next one
_MAX_WAIT = 10  # seconds: the longest wait before a retry, whatever Retry-After asks
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class DownloadReport:
    """Totals over every finished shard of an output folder (one per app: its latest check), plus this run's."""

    output_dir: str
    host: str
    requested: int  # apps in the URL table
    downloaded: int  # banners in the shards
    not_found: int  # HTTP 404: no vertical banner on Steam
    failures: dict[str, int] = field(default_factory=dict)  # every other failure: reason -> count
    pending: int = 0  # apps in shards not finished yet (an interrupted run): rerun to fetch them
    shards: int = 0  # finished shards
    new_downloads: int = 0  # banners in the shards this run finished
    seconds: float = 0.0
    images_per_second: float = 0.0  # this run's new_downloads / seconds
    # --update only: apps listed, ids never requested before, ids re-checked, and the new banners {appid: name}
    update: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        failed = sum(self.failures.values())
        lines = [
            f"{self.downloaded} of {self.requested} banners in {self.shards} shards in {self.output_dir}",
            f"  {self.not_found} without a vertical banner (HTTP 404), {failed} other failures"
            + (f", {self.pending} not attempted yet (run again to resume)" if self.pending else ""),
        ]
        lines += [f"    {count:>6}  {reason}" for reason, count in sorted(self.failures.items(), key=lambda r: (-r[1], r[0]))]
        if self.update:
            u = self.update
            names = [n or a for a, n in list(u["new_banners"].items())[:5]]
            lines.append(f"  update: {u['listed']} apps listed, {u['new']} never requested before, {u['rechecked']} "
                         f"re-checked (404 or failed over {u['recheck_days']:g} days ago): {len(u['new_banners'])} new banners"
                         + (f" ({', '.join(names)}{', ...' if len(u['new_banners']) > 5 else ''})" if names else ""))
        lines.append(f"  this run: {self.new_downloads} new in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ app list, URL table

Row = tuple[str, str, str]  # (url, appid, name); a blank row (appid "") only fills a finished shard up


def requested_apps(app_list, appids, default) -> dict[str, str]:
    """{appid: name} from a file or dict, explicit ids (names from the list when both are given), or ``default()``."""
    if isinstance(app_list, dict):
        names = parse_app_list(app_list)
    elif app_list is not None:
        names = load_app_names(app_list)
    elif appids is None:
        names = default()
    else:
        names = {}
    if appids is not None:
        ids = [str(a).strip() for a in appids]
        bad = [a for a in ids if not a.isdigit()]
        if bad:
            raise BannermatchError(f"app ids must be integers, got {', '.join(map(repr, bad[:5]))}")
        names = {a: names.get(a, "") for a in ids}
    if not names:
        raise BannermatchError("the app list is empty: nothing to download")
    return names


def _rows(names: dict[str, str], host: str) -> list[Row]:
    return [(banner_url(a, host), a, names[a]) for a in sorted(names, key=int)]


def _on_host(rows: list[Row], host: str) -> list[Row]:
    """The same rows with their URLs on ``host``: a download may go on from another CDN host."""
    return [(banner_url(a, host) if a else "", a, n) for _, a, n in rows]


def _read_rows(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["url", "appid", "name"]).to_pydict()
    return list(zip(table["url"], table["appid"], table["name"]))


def _write_rows(rows: list[Row], path: Path) -> None:
    """The parquet table img2dataset reads, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url, appid, name = zip(*rows)
    # appid a string, as sources.py expects, and no int overflow surprises
    table = pa.table({k: pa.array(v, pa.string()) for k, v in (("url", url), ("appid", appid), ("name", name))})
    atomic_write(path, lambda fh: pq.write_table(table, fh))


def _plan(output_dir: Path, saved: list[Row] | None, app_list, appids, host: str) -> list[Row]:
    """The rows to download: the saved table when resuming, else the given list (or the shipped one)."""
    if saved is not None and app_list is None and appids is None:
        log.info("resuming the download of the %d apps listed in %s", sum(bool(a) for _, a, _ in saved),
                 output_dir / URL_TABLE)
        return _on_host(saved, host)
    rows = _rows(requested_apps(app_list, appids, shipped_app_names), host)
    # Shard n holds rows n*SAMPLES_PER_SHARD...: finished shards only stay valid for the same apps in the same order.
    if saved is not None and _finished_shards(output_dir) and [a for _, a, _ in saved] != [a for _, a, _ in rows]:
        raise BannermatchError(f"{output_dir} already holds shards of another app list ({len(saved)} apps); "
                               "add new games with --update, or download this list into a new folder")
    return rows


def _drop_held(rows: list[Row], have: set[str], finished: set[int]) -> list[Row]:
    """The rows of shards not finished yet blanked where ``have`` (a snapshot) holds the app already: finishing
    an interrupted download (a fallback to the CDN alone, say) never fetches what the collection has."""
    return [("", "", "") if a in have and i // SAMPLES_PER_SHARD not in finished else (u, a, n)
            for i, (u, a, n) in enumerate(rows)]


def _plan_update(output_dir: Path, saved: list[Row] | None, app_list, appids, host: str, recheck_days: float,
                 have: set[str]) -> tuple[list[Row], dict]:
    """The saved rows, then blank rows up to the next shard, then the ids to request: those of the list (Steam's
    current one by default) neither in the shards nor in ``have``, and not checked (404 or failed) lately."""
    listed = requested_apps(app_list, appids, fetch_app_list)
    outcomes = _outcomes(output_dir)
    cutoff = time.time() - recheck_days * 86400
    new, rechecked = [], []
    for appid in sorted(listed, key=int):
        last = outcomes.get(appid)
        if appid in have or (last is not None and (last["status"] == "success" or last["checked"] > cutoff)):
            continue
        (new if last is None else rechecked).append(appid)
    rows = _on_host(saved or [], host)
    if new or rechecked:
        rows += [("", "", "")] * (-len(rows) % SAMPLES_PER_SHARD)
        rows += _rows({a: listed[a] for a in new + rechecked}, host)
    log.info("update: %d apps listed, %d never requested, %d to re-check", len(listed), len(new), len(rechecked))
    return rows, {"listed": len(listed), "new": len(new), "rechecked": len(rechecked), "recheck_days": recheck_days}


# ------------------------------------------------------------------------------------------ shards and report

def _shard_id(path: Path) -> int | None:
    m = re.fullmatch(r"(\d+)_stats\.json", path.name)
    return int(m.group(1)) if m else None


def _shard_name(shard: int) -> str:
    return f"{shard:0{_SHARD_DIGITS}d}"


def _finished_shards(output_dir: Path, drop_unreadable: bool = False) -> dict[int, dict]:
    """The per-shard stats (written when a shard is complete, after its tar and status table), by shard id.

    ``drop_unreadable``: delete stats files that do not parse (a kill while one was written), and those of shards
    whose status table is gone; both engines take any ``*_stats.json`` for a finished shard, so that shard would
    otherwise never be downloaded again."""
    stats = {}
    for path in output_dir.glob("*_stats.json"):
        shard = _shard_id(path)
        if shard is None:
            continue
        try:
            stats[shard] = json.loads(path.read_text())
            if not (output_dir / f"{_shard_name(shard)}.parquet").is_file():
                raise FileNotFoundError("no status table")
        except (OSError, ValueError):
            stats.pop(shard, None)
            log.warning("unreadable shard stats %s: that shard will be downloaded again", path)
            if drop_unreadable:
                path.unlink(missing_ok=True)
    return stats


def _outcomes(output_dir: Path) -> dict[str, dict]:
    """Each app's latest check over the finished shards: {appid: {status, reason, checked}}, from the status tables.

    ``status`` is "success", "not_found" or "failed"; ``checked`` the end time of the shard that checked it."""
    import pyarrow.parquet as pq

    outcomes: dict[str, dict] = {}
    finished = _finished_shards(output_dir)
    for shard in sorted(finished, key=lambda k: finished[k].get("end_time", 0)):  # a later check wins
        checked = int(finished[shard].get("end_time", 0))
        try:
            table = pq.read_table(output_dir / f"{_shard_name(shard)}.parquet",
                                  columns=["appid", "status", "error_message"]).to_pydict()
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise BannermatchError(f"cannot read the status table of shard {_shard_name(shard)} in {output_dir} ({exc}); "
                                   f"delete {_shard_name(shard)}_stats.json to download that shard again") from None
        for appid, status, error in zip(table["appid"], table["status"], table["error_message"]):
            if not appid:
                continue
            if status == "success":
                outcomes[appid] = {"status": "success", "checked": checked}
            else:
                reason = error or status or "unknown"
                kind = "not_found" if reason.startswith(_NOT_FOUND) else "failed"
                outcomes[appid] = {"status": kind, "reason": reason, "checked": checked}
    return outcomes


def _save_state(output_dir: Path, outcomes: dict[str, dict]) -> None:
    """The apps whose last check was a 404 or a failure, with when (Unix time): what ``--update`` re-checks once
    old enough. Compact: Steam's keyless list holds ~170k apps without a vertical banner."""
    ids = sorted(outcomes, key=int)
    state = {"version": 1,
             "not_found": {a: outcomes[a]["checked"] for a in ids if outcomes[a]["status"] == "not_found"},
             "failed": {a: [outcomes[a]["checked"], outcomes[a]["reason"]] for a in ids if outcomes[a]["status"] == "failed"}}
    text = json.dumps(state, ensure_ascii=False, separators=(",", ":"))
    path = output_dir / STATE_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _report(output_dir: Path, host: str, rows: list[Row], outcomes: dict[str, dict], before: set[int],
            seconds: float) -> DownloadReport:
    n_shards = math.ceil(len(rows) / SAMPLES_PER_SHARD)
    stats = {k: v for k, v in _finished_shards(output_dir).items() if k < n_shards}
    requested = {a for _, a, _ in rows if a}
    latest = [o for a, o in outcomes.items() if a in requested]
    failures = Counter(o["reason"] for o in latest if o["status"] == "failed")
    new = sum(s["successes"] for k, s in stats.items() if k not in before)
    return DownloadReport(
        output_dir=str(output_dir), host=host, requested=len(requested),
        downloaded=sum(o["status"] == "success" for o in latest), not_found=sum(o["status"] == "not_found" for o in latest),
        failures=dict(failures), pending=len(requested) - len(latest), shards=len(stats), new_downloads=new,
        seconds=round(seconds, 3), images_per_second=round(new / seconds, 2) if seconds > 0 else 0.0,
    )


def _sample_key(shard: int, index: int) -> str:
    """img2dataset's sample key: the shard id, then the index in the shard on as many digits as the shard size needs."""
    digits = math.ceil(math.log10(SAMPLES_PER_SHARD))
    return f"{shard * 10 ** digits + index:0{_SHARD_DIGITS + digits}d}"


def _check_reachable(host: str, timeout: float) -> None:
    """Fail fast, in one line, when the CDN cannot be reached, instead of recording every banner as failed."""
    try:
        with urllib.request.urlopen(urllib.request.Request(host, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # any HTTP answer means the host is there
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        raise NetworkUnreachable(host, exc) from None


# ------------------------------------------------------------------------------------------ the light engine

class _Interrupted(Exception):
    """The run is stopping (Ctrl-C or an error elsewhere): a worker gives up its banner."""


def _failure_reason(exc: BaseException) -> str:
    """A short, stable reason for a failed request, for the report: the same failure always counts under one name."""
    import requests

    seen, todo = [], [exc]
    while todo:  # requests wraps urllib3's errors, which wrap the socket's: look at the whole chain
        e = todo.pop()
        if isinstance(e, BaseException) and e not in seen:
            seen.append(e)
            todo += [e.__cause__, e.__context__, *e.args]
    if any(isinstance(e, (requests.Timeout, socket.timeout, TimeoutError)) or "timed out" in str(e) for e in seen):
        return "timed out"
    if any(isinstance(e, http.client.IncompleteRead) or type(e).__name__ == "IncompleteRead" for e in seen):
        return "IncompleteRead: the connection closed before the whole banner came"
    for kind, reason in ((ConnectionResetError, "Connection reset by peer"), (ConnectionRefusedError, "Connection refused")):
        if any(isinstance(e, kind) for e in seen):
            return reason
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _get_banner(session, url: str, timeout: float, stop: threading.Event) -> tuple[bytes | None, str | None, float | None]:
    """One attempt: (body, None, None) on a 200; else (None, reason, None when retrying is pointless, else the
    seconds the server asked to wait (Retry-After) or -1 for none)."""
    deadline = time.monotonic() + _ATTEMPT_TIMEOUTS * timeout
    with session.get(url, timeout=timeout, stream=True) as response:
        if response.status_code != 200:
            reason = f"HTTP Error {response.status_code}: {response.reason}"
            if response.status_code not in _RETRY_STATUS:
                return None, reason, None
            after = response.headers.get("Retry-After", "").strip()
            return None, reason, float(after) if after.isdigit() else -1
        body = io.BytesIO()
        # read1: whatever one read of the socket gives, so the deadline is checked as bytes come (iter_content
        # would wait for 64 kB, and a server sending a byte now and then never trips the read timeout)
        while chunk := response.raw.read1(1 << 16):
            body.write(chunk)
            if stop.is_set():
                raise _Interrupted
            if time.monotonic() > deadline:  # bytes trickle in too slowly to ever end in time
                raise TimeoutError("timed out")
            if body.tell() > _MAX_BANNER_BYTES:
                return None, f"larger than {_MAX_BANNER_BYTES >> 20} MB: not a banner", None
        return body.getvalue(), None, None


def _fetch(session, url: str, timeout: float, retries: int, stop: threading.Event) -> tuple[bytes | None, str | None]:
    """The banner's bytes, or why not after ``retries`` more attempts for 429, 5xx, cuts, resets and timeouts."""
    from urllib3.exceptions import HTTPError as Urllib3Error  # what reading the body raises (requests' are OSErrors)

    for attempt in range(retries + 1):
        try:
            data, reason, wait_for = _get_banner(session, url, timeout, stop)
            if wait_for is None:
                return data, reason
        except (OSError, http.client.HTTPException, Urllib3Error) as exc:
            reason, wait_for = _failure_reason(exc), -1
        if attempt < retries:
            # the server's Retry-After, or an exponential backoff with jitter; never longer than _MAX_WAIT
            delay = wait_for if wait_for >= 0 else _BACKOFF * 2 ** attempt * (1 + random.random() / 2)
            if stop.wait(min(delay, _MAX_WAIT)):
                raise _Interrupted
    return None, reason


def _resize(data: bytes) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """As img2dataset's keep_ratio, resize_only_if_bigger: the short side down to IMAGE_SIZE, never up; JPEG q95."""
    from PIL import Image

    try:
        image = decode_image(data)
    except SkipImage as exc:
        raise ValueError(_DECODE_ERROR) from exc
    original = image.size
    short = min(original)
    if short > IMAGE_SIZE:  # area averaging, as img2dataset's cv2.INTER_AREA
        scale = IMAGE_SIZE / short
        image = image.resize(tuple(IMAGE_SIZE if side == short else round(side * scale) for side in original),
                             Image.Resampling.BOX)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue(), image.size, original
@dataclass
class _Result:
    """What became of one app of a shard."""

    error: str | None = None
    jpeg: bytes | None = None
    size: tuple[int, int] | None = None
    original_size: tuple[int, int] | None = None
    sha256: str | None = None
    resize_failed: bool = False


def _download_one(session, url: str, timeout: float, retries: int, stop: threading.Event) -> _Result:
    import hashlib

    data, error = _fetch(session, url, timeout, retries, stop)
    if data is None:
        return _Result(error)
    try:
        jpeg, size, original = _resize(data)
    except ValueError as exc:
        return _Result(str(exc), resize_failed=True)
    return _Result(None, jpeg, size, original, hashlib.sha256(data).hexdigest())


def _write_shard(output_dir: Path, shard: int, rows: list[Row], results: dict[int, _Result], start: float) -> None:
    """The tar, then the status table, then the stats that mark the shard finished; each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    end = time.time()
    name = _shard_name(shard)
    status: Counter[str] = Counter()
    metas = []
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (url, appid, app_name) in enumerate(rows):
            if not appid:
                continue
            r = results[index]
            key = _sample_key(shard, index)
            meta = {"url": url, "appid": appid, "name": app_name, "key": key,
                    "status": "success" if r.error is None else "failed_to_resize" if r.resize_failed else "failed_to_download",
                    "error_message": r.error,
                    "width": r.size[0] if r.size else None, "height": r.size[1] if r.size else None,
                    "original_width": r.original_size[0] if r.original_size else None,
                    "original_height": r.original_size[1] if r.original_size else None, "sha256": r.sha256}
            metas.append(meta)
            status[r.error or "success"] += 1
            if r.error is None:
                for suffix, data in (("jpg", r.jpeg), ("json", json.dumps(meta, indent=4).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), int(end), 0o444
                    tar.addfile(info, io.BytesIO(data))
    atomic_write(output_dir / f"{name}.tar", lambda fh: fh.write(tar_bytes.getbuffer()))
    columns = ("url", "appid", "name", "key", "status", "error_message", "width", "height", "original_width",
               "original_height", "sha256")
    types = {c: pa.int32() if "width" in c or "height" in c else pa.string() for c in columns}
    table = pa.table({c: pa.array([m[c] for m in metas], types[c]) for c in columns})
    atomic_write(output_dir / f"{name}.parquet", lambda fh: pq.write_table(table, fh))
    stats = {"count": len(metas), "successes": status["success"],
             "failed_to_download": sum(not r.resize_failed and r.error is not None for r in results.values()),
             "failed_to_resize": sum(r.resize_failed for r in results.values()),
             "duration": end - start, "start_time": start, "end_time": end, "status_dict": dict(status)}
    atomic_write(output_dir / f"{name}_stats.json", lambda fh: fh.write(json.dumps(stats, indent=4).encode()))


def _run_light(rows: list[Row], pending: list[int], output_dir: Path, threads: int, timeout: float, retries: int,
               progress: bool) -> None:
    """Download the pending shards with a thread pool, one requests Session (connection pool) per thread; a shard
    is written as soon as its last banner is in, at most _OPEN_SHARDS at a time."""
    import requests
    from tqdm.auto import tqdm

    local, sessions, lock = threading.local(), [], threading.Lock()
    stop = threading.Event()

    def work(url: str) -> _Result:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.headers["User-Agent"] = "bannermatch (Steam banner similarity research; python-requests)"
            with lock:
                sessions.append(session)
        return _download_one(session, url, timeout, retries, stop)

    todo = sorted(pending)
    shard_rows = {k: rows[k * SAMPLES_PER_SHARD:(k + 1) * SAMPLES_PER_SHARD] for k in todo}
    bar = tqdm(total=sum(bool(a) for k in todo for _, a, _ in shard_rows[k]), unit="banner", desc="banners",
               disable=not progress)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="bannermatch-download")
    futures: dict = {}
    open_shards: dict[int, tuple[float, dict[int, _Result], int]] = {}  # shard -> (start, results, apps)
    try:
        while todo or futures:
            while todo and len(open_shards) < _OPEN_SHARDS:
                shard = todo.pop(0)
                items = [(i, url) for i, (url, appid, _) in enumerate(shard_rows[shard]) if appid]
                if not items:  # every app of it is held elsewhere (_drop_held): finished as it is
                    _write_shard(output_dir, shard, shard_rows[shard], {}, time.time())
                    continue
                open_shards[shard] = (time.time(), {}, len(items))
                for i, url in items:
                    futures[pool.submit(work, url)] = (shard, i)
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                shard, i = futures.pop(future)
                start, results, n = open_shards[shard]
                results[i] = future.result()
                bar.update(1)
                if len(results) == n:
                    _write_shard(output_dir, shard, shard_rows[shard], results, start)
                    del open_shards[shard]
    finally:
        stop.set()  # workers still busy give up their banner at the next chance (within `timeout`)
        pool.shutdown(wait=True, cancel_futures=True)
        for session in sessions:
            session.close()
        bar.close()


# ------------------------------------------------------------------------------------------ the img2dataset engine

@contextlib.contextmanager
def _our_json_files_aside(output_dir: Path):
    """img2dataset treats every *.json in its output folder as a shard's stats (``int(name.split('_')[0])``),
    so our own JSON files would crash its incremental mode: keep them out of its sight while it runs."""
    moved = []
    for name in (APP_NAMES_FILE, REPORT_FILE, STATE_FILE):
        path = output_dir / name
        if path.is_file():
            aside = output_dir / f"{name}.aside"
            path.replace(aside)
            moved.append((aside, path))
    try:
        yield
    finally:
        for aside, path in moved:
            if not path.exists():
                aside.replace(path)


@contextlib.contextmanager
def _shard_progress(output_dir: Path, pending: set[int], total: int, enabled: bool):
    """A tqdm bar of apps processed, advanced as img2dataset finishes shards (it writes their stats last)."""
    from tqdm.auto import tqdm

    stop = threading.Event()
    bar = tqdm(total=total, unit="app", desc="banners", disable=not enabled)

    def watch():
        seen: set[int] = set()
        while not stop.wait(0.5):
            for shard, s in _finished_shards(output_dir).items():
                if shard in pending and shard not in seen:
                    seen.add(shard)
                    bar.update(s.get("count", 0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        bar.close()


def _run_img2dataset(rows: list[Row], pending: list[int], output_dir: Path, processes: int, threads: int,
                     distributor: str, timeout: float, retries: int, progress: bool) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check (a network call) from its resizer
    import img2dataset

    apps = sum(bool(a) for k in pending for _, a, _ in rows[k * SAMPLES_PER_SHARD:(k + 1) * SAMPLES_PER_SHARD])
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with _our_json_files_aside(output_dir), _shard_progress(output_dir, set(pending), apps, progress):
            img2dataset.download(
                url_list=str(output_dir / URL_TABLE), input_format="parquet", url_col="url",
                save_additional_columns=["appid", "name"], output_folder=str(output_dir), output_format="webdataset",
                number_sample_per_shard=SAMPLES_PER_SHARD, image_size=IMAGE_SIZE, resize_mode="keep_ratio",
                resize_only_if_bigger=True, encode_format="jpg", encode_quality=95, extract_exif=False,
                processes_count=processes, thread_count=threads, distributor=distributor,
                timeout=timeout, retries=retries, incremental_mode="incremental",
                enable_wandb=False, user_agent_token="bannermatch",
            )
    except SystemExit:
        # img2dataset's own Ctrl-C handler cleans up, then calls sys.exit(0): report it as the interrupt it is.
        raise KeyboardInterrupt from None
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous_sigint)  # do not leave its sys.exit handler in a notebook


# ------------------------------------------------------------------------------------------ download_banners

def _need(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise BannermatchError(f"downloading needs {module}: pip install 'bannermatch[{extra}]'")


def download_banners(output_dir, app_list=None, appids=None, host: str = STEAM_CDN, processes: int | None = None,
                     threads: int | None = None, distributor: str = "multiprocessing", timeout: float = 10,
                     retries: int = 2, progress: bool = True, *, engine: str = "light", update: bool = False,
                     recheck_days: float = DEFAULT_RECHECK_DAYS, have=()) -> DownloadReport:
    """Download the vertical banner of every app into webdataset shards in ``output_dir``; resumable.

    ``app_list``: a JSON file or a dict (``{appid: name}`` or the Steam Web API's GetAppList shape), or None for
    the list shipped with the package (29,982 games that had a vertical banner in 2021), or, when ``output_dir``
    already has a URL table, that saved list: a rerun resumes.
    ``appids``: explicit app ids (a subset of ``app_list`` when both are given; names from it).
    ``update``: add what the folder lacks: the apps of ``app_list``/``appids`` (default: Steam's current list,
    see :func:`bannermatch.steam.fetch_app_list`) that are not in its shards nor in ``have`` (app ids held
    elsewhere, e.g. a snapshot), plus those whose last check, a 404 or a failure, is over ``recheck_days`` old.
    They go into new shards; an interrupted download is finished first, without the apps in ``have``.
    ``host``: the CDN serving ``/steam/apps/{appid}/library_600x900.jpg``.
    ``engine``: "light" (requests, ``threads`` parallel downloads, default 32) or "img2dataset" (``processes``,
    default the CPU count up to 4, x ``threads``; ``distributor`` "multiprocessing", or "pyspark"/"ray" on a
    cluster; it starts processes with "spawn": a script calling it needs an ``if __name__ == "__main__":`` guard).
    ``timeout`` seconds per request, ``retries`` more attempts per failed banner (the light engine retries 429,
    5xx, cut or reset connections and timeouts with a backoff, not 404s; an attempt lasts 3 x ``timeout`` at most).
    """
    if engine not in ENGINES:
        raise BannermatchError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if distributor not in DISTRIBUTORS:
        raise BannermatchError(f"unknown distributor {distributor!r}; choose one of {', '.join(DISTRIBUTORS)}")
    if distributor != "multiprocessing" and engine != "img2dataset":
        raise BannermatchError(f"the {distributor} distributor is img2dataset's: add --engine img2dataset")
    if distributor != "multiprocessing" and importlib.util.find_spec(distributor) is None:
        raise BannermatchError(f"the {distributor} distributor needs `pip install {distributor}`")
    _need("pyarrow", "download")
    _need(*(("img2dataset", "img2dataset") if engine == "img2dataset" else ("requests", "download")))
    processes = processes or min(os.cpu_count() or 1, 4)
    threads = threads or DEFAULT_THREADS
    if processes < 1 or threads < 1 or retries < 0 or not timeout > 0 or recheck_days < 0:
        raise BannermatchError("processes and threads must be at least 1, retries and recheck days at least 0, "
                               "timeout above 0")
    if urllib.parse.urlparse(host).scheme not in ("http", "https"):
        raise BannermatchError(f"--host must be an http(s) URL, got {host!r}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = output_dir / URL_TABLE
    saved = _read_rows(table) if table.is_file() else None
    before = set(_finished_shards(output_dir, drop_unreadable=True))
    collection_before = {a for a, o in _outcomes(output_dir).items() if o["status"] == "success"}
    start = time.perf_counter()

    written = saved

    def run(rows: list[Row]) -> None:
        nonlocal written
        finished = set(_finished_shards(output_dir, drop_unreadable=True))
        pending = [k for k in range(math.ceil(len(rows) / SAMPLES_PER_SHARD)) if k not in finished]
        if pending:  # before the table is saved: an offline run leaves no list behind for the next run to finish
            _check_reachable(host, timeout)
        if rows != written:  # img2dataset reads the table from the folder
            _write_rows(rows, table)
            written = rows
        try:
            if not pending:
                log.info("all %d shards in %s are done", len(finished), output_dir)
                return
            log.info("downloading %d shards from %s with the %s engine", len(pending), host, engine)
            if engine == "light":
                _run_light(rows, pending, output_dir, threads, timeout, retries, progress)
            else:
                _run_img2dataset(rows, pending, output_dir, processes, threads, distributor, timeout, retries, progress)
        finally:  # names are saved even when interrupted, so a partial download shows names too
            known = load_app_names(output_dir / APP_NAMES_FILE) if (output_dir / APP_NAMES_FILE).is_file() else {}
            save_app_names({**known, **{a: n for _, a, n in rows if a and n}}, output_dir / APP_NAMES_FILE)

    update_info = {}
    if update:
        have = {str(a) for a in have}
        if saved is not None:  # finish an interrupted download first: the new shards start after the last one
            run(_drop_held(_on_host(saved, host), have, set(_finished_shards(output_dir))))
        rows, update_info = _plan_update(output_dir, written, app_list, appids, host, recheck_days, have)
    else:
        rows = _plan(output_dir, saved, app_list, appids, host)
    if not rows:
        raise BannermatchError(f"nothing to update in {output_dir}: every listed app is already there")
    run(rows)
    outcomes = _outcomes(output_dir)
    _save_state(output_dir, outcomes)
    report = _report(output_dir, host, rows, outcomes, before, time.perf_counter() - start)
    if update:
        names = {a: n for _, a, n in rows if a}
        report.update = {**update_info, "new_banners": {
            a: names.get(a, "") for a, o in sorted(outcomes.items(), key=lambda o: int(o[0]))
            if o["status"] == "success" and a not in collection_before}}
    (output_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    return report
