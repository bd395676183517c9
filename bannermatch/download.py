"""Download Steam's vertical banners as webdataset shards with img2dataset, or fetch the older archive release.

``download_banners`` writes, in its output folder:

- ``banner_urls.parquet``: the URL table (url, appid, name; appid a string) img2dataset reads;
- ``00000.tar`` ...: webdataset shards, ``{key}.jpg`` (256 px on the short side, 2:3 kept) + ``{key}.json``
  (which holds ``appid`` and ``name``), readable in place by :func:`bannermatch.sources.open_source`;
- ``00000.parquet`` / ``00000_stats.json``: img2dataset's per-shard status table and counts;
- ``apps.json``: every requested app's name, so later steps show names offline;
- ``download_report.json``: the :class:`DownloadReport`.

Reruns resume: img2dataset's incremental mode skips every shard whose ``_stats.json`` exists.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BannermatchError
from .steam import (APP_NAMES_FILE, STEAM_CDN, NetworkUnreachable, banner_url, fetch_app_list, load_app_names,
                    parse_app_list, save_app_names)

log = logging.getLogger(__name__)

URL_TABLE = "banner_urls.parquet"
REPORT_FILE = "download_report.json"
IMAGE_SIZE = 256  # short side: 300x450 banners become 256x384
SAMPLES_PER_SHARD = 1000  # the unit of resumption: ~30 shards for the 30k games with a vertical banner
DEFAULT_THREADS = 32  # per process; downloads wait on the network, so many threads per core
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
_SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shards are named 00000.tar, 00000_stats.json, ...
_NOT_FOUND = "HTTP Error 404"  # urllib's message, as img2dataset records it: the game has no vertical banner
_CHUNK = 1 << 20


@dataclass
class DownloadReport:
    """Totals over every finished shard of an output folder, plus this run's time and speed."""

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
        lines.append(f"  this run: {self.new_downloads} new in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ app list, URL table

def _resolve_app_list(app_list, appids, output_dir: Path) -> dict[str, str]:
    """{appid: name} to download: from a file or dict, explicit ids, the saved table (to resume), or Steam."""
    if isinstance(app_list, dict):
        names = parse_app_list(app_list)
    elif app_list is not None:
        names = load_app_names(app_list)
    elif appids is None and (output_dir / URL_TABLE).is_file():
        names = _read_url_table(output_dir / URL_TABLE)
        log.info("resuming the download of the %d apps listed in %s", len(names), output_dir / URL_TABLE)
    elif appids is None:
        names = fetch_app_list()
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


def _read_url_table(path: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["appid", "name"]).to_pydict()
    return dict(zip(table["appid"], table["name"]))


def _write_url_table(names: dict[str, str], host: str, output_dir: Path) -> Path:
    """The parquet table img2dataset reads, in app id order; refuses to mix two lists in one folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    appids = sorted(names, key=int)
    table = pa.table({
        "url": pa.array([banner_url(a, host) for a in appids], pa.string()),
        "appid": pa.array(appids, pa.string()),  # a string, as sources.py expects, and no int overflow surprises
        "name": pa.array([names[a] for a in appids], pa.string()),
    })
    path = output_dir / URL_TABLE
    # Shard n holds rows n*SAMPLES_PER_SHARD...: finished shards only stay valid for the same URLs in the same order.
    if path.is_file() and _finished_shards(output_dir):
        old = pq.read_table(path, columns=["url"]).column("url").to_pylist()
        if old != table.column("url").to_pylist():
            raise BannermatchError(f"{output_dir} already holds shards of another URL list ({len(old)} apps); "
                                   "download this list into a new folder")
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ shards and report

def _shard_id(path: Path) -> int | None:
    m = re.fullmatch(r"(\d+)_stats\.json", path.name)
    return int(m.group(1)) if m else None


def _finished_shards(output_dir: Path, drop_unreadable: bool = False) -> dict[int, dict]:
    """img2dataset's per-shard stats (written when a shard is complete), by shard id.

    ``drop_unreadable``: delete stats files that do not parse (a kill while img2dataset wrote one); img2dataset
    takes any ``*_stats.json`` for a finished shard, so that shard would otherwise never be downloaded again."""
    stats = {}
    for path in output_dir.glob("*_stats.json"):
        shard = _shard_id(path)
        if shard is not None:
            try:
                stats[shard] = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("unreadable shard stats %s: that shard will be downloaded again", path)
                if drop_unreadable:
                    path.unlink(missing_ok=True)
    return stats


def _report(output_dir: Path, host: str, requested: int, before: set[int], seconds: float) -> DownloadReport:
    n_shards = math.ceil(requested / SAMPLES_PER_SHARD)
    stats = {k: v for k, v in _finished_shards(output_dir).items() if k < n_shards}
    reasons: Counter[str] = Counter()
    for s in stats.values():
        reasons.update(s.get("status_dict", {}))
    reasons.pop("success", None)
    not_found = sum(n for reason, n in reasons.items() if reason.startswith(_NOT_FOUND))
    failures = {reason: n for reason, n in reasons.items() if not reason.startswith(_NOT_FOUND)}
    new = sum(s["successes"] for k, s in stats.items() if k not in before)
    return DownloadReport(
        output_dir=str(output_dir), host=host, requested=requested,
        downloaded=sum(s["successes"] for s in stats.values()), not_found=not_found, failures=failures,
        pending=requested - sum(s["count"] for s in stats.values()), shards=len(stats), new_downloads=new,
        seconds=round(seconds, 3), images_per_second=round(new / seconds, 2) if seconds > 0 else 0.0,
    )


@contextlib.contextmanager
def _our_json_files_aside(output_dir: Path):
    """img2dataset treats every *.json in its output folder as a shard's stats (``int(name.split('_')[0])``),
    so apps.json and the report would crash its incremental mode: keep them out of its sight while it runs."""
    moved = []
    for name in (APP_NAMES_FILE, REPORT_FILE):
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


def _check_reachable(host: str, timeout: float) -> None:
    """Fail fast, in one line, when the CDN cannot be reached, instead of recording every banner as failed."""
    try:
        with urllib.request.urlopen(urllib.request.Request(host, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # any HTTP answer means the host is there
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        raise NetworkUnreachable(host, exc) from None


def _run_img2dataset(table: Path, output_dir: Path, processes: int, threads: int, distributor: str,
                     timeout: float, retries: int) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check (a network call) from its resizer
    import img2dataset

    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        img2dataset.download(
            url_list=str(table), input_format="parquet", url_col="url", save_additional_columns=["appid", "name"],
            output_folder=str(output_dir), output_format="webdataset", number_sample_per_shard=SAMPLES_PER_SHARD,
            image_size=IMAGE_SIZE, resize_mode="keep_ratio", resize_only_if_bigger=True,
            encode_format="jpg", encode_quality=95, extract_exif=False,
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


def download_banners(output_dir, app_list=None, appids=None, host: str = STEAM_CDN, processes: int | None = None,
                     threads: int | None = None, distributor: str = "multiprocessing", timeout: float = 10,
                     retries: int = 2, progress: bool = True) -> DownloadReport:
    """Download the vertical banner of every app into webdataset shards in ``output_dir``; resumable.

    ``app_list``: a JSON file or a dict (``{appid: name}`` or the Steam Web API's GetAppList shape), or None for
    the Steam Web API (or, when ``output_dir`` already has a URL table, that saved list: a rerun resumes).
    ``appids``: explicit app ids (a subset of ``app_list`` when both are given; names from it).
    ``host``: the CDN serving ``/steam/apps/{appid}/library_600x900.jpg``.
    ``processes`` (default: the CPU count, at most 4) x ``threads`` (default 32) parallel downloads;
    ``distributor``: "multiprocessing" on one machine, "pyspark" or "ray" on a cluster (install them first).
    ``timeout`` seconds per request, ``retries`` more attempts per failed banner.
    img2dataset starts its processes with "spawn": a script calling this needs an ``if __name__ == "__main__":`` guard.
    """
    if distributor not in DISTRIBUTORS:
        raise BannermatchError(f"unknown distributor {distributor!r}; choose one of {', '.join(DISTRIBUTORS)}")
    if distributor != "multiprocessing" and importlib.util.find_spec(distributor) is None:
        raise BannermatchError(f"the {distributor} distributor needs `pip install {distributor}`")
    processes = processes or min(os.cpu_count() or 1, 4)
    threads = threads or DEFAULT_THREADS
    if processes < 1 or threads < 1 or retries < 0 or not timeout > 0:
        raise BannermatchError("processes and threads must be at least 1, retries at least 0, timeout above 0")
    if urllib.parse.urlparse(host).scheme not in ("http", "https"):
        raise BannermatchError(f"--host must be an http(s) URL, got {host!r}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = _resolve_app_list(app_list, appids, output_dir)
    table = _write_url_table(names, host, output_dir)
    before = set(_finished_shards(output_dir, drop_unreadable=True))
    pending = set(range(math.ceil(len(names) / SAMPLES_PER_SHARD))) - before
    start = time.perf_counter()
    try:
        if pending:
            _check_reachable(host, timeout)
            pending_apps = sum(min(SAMPLES_PER_SHARD, len(names) - k * SAMPLES_PER_SHARD) for k in pending)
            log.info("downloading %d banners (%d shards) from %s with %d processes x %d threads",
                     pending_apps, len(pending), host, processes, threads)
            with _our_json_files_aside(output_dir), _shard_progress(output_dir, pending, pending_apps, progress):
                _run_img2dataset(table, output_dir, processes, threads, distributor, timeout, retries)
        else:
            log.info("all %d shards in %s are already done", len(before), output_dir)
    finally:  # names are saved even when interrupted, so a partial download shows names too
        save_app_names({a: n for a, n in names.items() if n}, output_dir / APP_NAMES_FILE)
    report = _report(output_dir, host, len(names), before, time.perf_counter() - start)
    (output_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    return report


# ------------------------------------------------------------------------------------------ the older archive

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
