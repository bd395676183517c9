"""Download hardening: kill -9 at random points then resume, and per-item network failures (429, cut or reset
bodies, timeouts) that are retried or reported, in bounded time. Both engines (light, and the real img2dataset)
against servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import APPS
from test_download import banner_path, jpeg, send, serve

from bannermatch import download, steam
from bannermatch.download import REPORT_FILE, download_banners

SHARD = 4  # samples per shard in these tests
# The shard size is a module constant: the subprocess sets it, then runs the real CLI.
_RUN_CLI = ("import sys; from bannermatch import download; download.SAMPLES_PER_SHARD = int(sys.argv[1]); "
            "from bannermatch.cli import main; sys.exit(main(sys.argv[2:]))")


def _quiet(server):
    server.httpd.handle_error = lambda *a: None  # a killed client breaks pipes: expected here, not worth a traceback
    return server


def _shards(out: Path) -> dict[str, tuple[str, bytes]]:
    """{appid: (name, jpg bytes)} over the finished shards (those with a _stats.json), each checked whole first."""
    content = {}
    for stats_file in sorted(out.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())  # never half-written
        tar_path = out / stats_file.name.replace("_stats.json", ".tar")
        with tarfile.open(tar_path) as tar:  # opens and reads to the end: a complete tar
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        jpgs = {n[:-4]: data for n, data in members.items() if n.endswith(".jpg")}
        assert len(jpgs) == stats["successes"], f"{tar_path.name} holds {len(jpgs)} images, its stats count {stats['successes']}"
        for key, data in jpgs.items():
            meta = json.loads(members[key + ".json"])
            assert meta["appid"] not in content
            content[meta["appid"]] = (meta["name"], data)
    return content


# ------------------------------------------------------------------------------------------ kill -9, resume

KILL_APPS = dict(sorted(APPS.items(), key=lambda a: int(a[0]))[:18])  # 5 shards of 4 (the last one of 2)
KILL_MISSING = {"440", "620"}  # 404: no vertical banner
DELAY = 0.15  # seconds per banner answer: the kill (within 0.1 s of a request arriving) is always before that answer


@pytest.fixture(scope="module")
def slow_cdn():
    def banner(i):
        data = jpeg(100 + i)

        def handle(handler):
            time.sleep(DELAY)
            send(handler, data)
        return handle

    routes = {banner_path(a): banner(i) for i, a in enumerate(KILL_APPS) if a not in KILL_MISSING}
    with serve(routes) as server:
        yield _quiet(server)


def _download_cli(out: Path, app_list: Path, host: str, engine: str, log: Path, **popen) -> subprocess.Popen:
    args = ["download", out, "--app-list", app_list, "--host", host, "--processes", "1", "--threads", "4",
            "--timeout", "5", "--retries", "1", "--quiet", "--engine", engine]
    with open(log, "a") as err:
        return subprocess.Popen([sys.executable, "-c", _RUN_CLI, str(SHARD), *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=err, **popen)


@pytest.fixture(scope="module")
def reference(slow_cdn, tmp_path_factory, engine):
    """An uninterrupted download of KILL_APPS (in this process; the CLI only wraps the same call), per engine:
    their resizers differ, so their JPEG bytes do."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(download, "SAMPLES_PER_SHARD", SHARD)
        report = download_banners(out, app_list=KILL_APPS, host=slow_cdn.url, processes=1, threads=4, timeout=5,
                                  retries=1, progress=False, engine=engine)
    good = {a: n for a, n in KILL_APPS.items() if a not in KILL_MISSING}
    assert (report.downloaded, report.not_found, report.failures, report.shards) == (len(good), 2, {}, N_SHARDS)
    content = _shards(out)
    assert {a: name for a, (name, _) in content.items()} == good
    return out, content


N_SHARDS = -(-len(KILL_APPS) // SHARD)


def test_kill_9_during_download_then_resume_gives_the_uninterrupted_shards(tmp_path, slow_cdn, reference, engine):
    _, expected = reference
    app_list = tmp_path / "apps.json"
    app_list.write_text(json.dumps(KILL_APPS))
    log = tmp_path / "stderr.log"
    for seed in range(2):
        rng = random.Random(seed)
        out = tmp_path / f"run{seed}"
        before = len(slow_cdn.gets("/steam/apps/"))
        target = before + rng.randint(1, (N_SHARDS - 1) * SHARD)  # a request of a shard before the last
        proc = _download_cli(out, app_list, slow_cdn.url, engine, log, start_new_session=True)
        deadline = time.monotonic() + 90
        while len(slow_cdn.gets("/steam/apps/")) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.1))
        assert proc.poll() is None, f"seed {seed}: the download ended before the kill: {log.read_text()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, img2dataset's worker pool and its logger process
        proc.wait()
        assert len(slow_cdn.gets("/steam/apps/")) - before >= target - before  # killed while working
        content = _shards(out)  # every shard with stats opens whole and holds its counted images
        assert len(list(out.glob("*_stats.json"))) < N_SHARDS, f"seed {seed}: nothing was left to do at the kill"
        assert all(item == expected[appid] for appid, item in content.items())  # finished shards are already right

        resumed = _download_cli(out, app_list, slow_cdn.url, engine, log)
        assert resumed.wait(timeout=180) == 0, log.read_text()[-3000:]
        assert _shards(out) == expected  # same app ids, names and JPEG bytes as the uninterrupted run
        report = json.loads((out / REPORT_FILE).read_text())
        assert (report["downloaded"], report["not_found"], report["failures"], report["pending"], report["shards"]) == (
            len(expected), 2, {}, 0, N_SHARDS)
        assert steam.load_app_names(out / steam.APP_NAMES_FILE) == KILL_APPS
        assert not (out / "_tmp").exists() and not list(out.glob("*.aside"))
        # what a kill left half-written is never taken for a shard: a file ending in .tar is a whole one
        assert not [p for p in out.iterdir() if ".tmp" in p.name and p.name.endswith((".tar", ".json", ".parquet"))]


def test_a_stats_file_cut_by_a_kill_makes_its_shard_download_again(tmp_path, slow_cdn, reference, monkeypatch, engine):
    """kill -9 while img2dataset writes a shard's _stats.json leaves it cut short, after the tar: img2dataset takes
    any *_stats.json for a finished shard, so without care that shard would never be fetched again. (The light
    engine writes it atomically, but a folder may have been started by the other engine.)"""
    monkeypatch.setattr(download, "SAMPLES_PER_SHARD", SHARD)
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    (out / "00001_stats.json").write_text('{"count": 4, "succ')
    gets = len(slow_cdn.gets("/steam/apps/"))
    again = download_banners(out, host=slow_cdn.url, processes=1, threads=4, timeout=5, retries=1, progress=False,
                             engine=engine)
    fetched = {p.split("/")[-2] for _, p, _ in slow_cdn.gets("/steam/apps/")[gets:]}
    assert fetched == set(sorted(KILL_APPS, key=int)[SHARD:2 * SHARD])  # shard 1 alone, 404s included
    assert (again.shards, again.pending, again.new_downloads) == (N_SHARDS, 0, 2)
    assert _shards(out) == reference[1]


# ------------------------------------------------------------------------------------------ network failures

TIMEOUT = 1.0  # seconds per request
RETRIES = 2  # three attempts per banner


def _fail_first(n, fail, data):
    """Answers with ``fail(handler)`` the first ``n`` times, then serves the banner."""
    calls = []
    lock = threading.Lock()

    def handle(handler):
        with lock:
            calls.append(1)
            first = len(calls) <= n
        (fail if first else lambda h: send(h, data))(handler)
    return handle


def too_many_requests(handler):
    send(handler, b"slow down", status=429, headers=[("Retry-After", "1")])


def cut_body(data, reset=False):
    """Announces all of ``data``, sends half, hangs up: a FIN, or a TCP reset (SO_LINGER 0)."""
    def fail(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[:len(data) // 2])
        handler.wfile.flush()
        if reset:
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
        handler.close_connection = True
    return fail


def stall(release: threading.Event, data=None):
    """Never answers (``data`` None), or sends the headers and a quarter of the body, then goes quiet."""
    def fail(handler):
        if data is not None:
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data[:len(data) // 4])
            handler.wfile.flush()
        release.wait(30)  # set when the test ends: no server thread outlives it for long
        handler.close_connection = True
    return fail


def test_network_failures_are_retried_or_reported_per_item_in_bounded_time(tmp_path, monkeypatch, engine):
    monkeypatch.setattr(download, "SAMPLES_PER_SHARD", SHARD)
    release = threading.Event()
    ids = sorted(APPS, key=int)
    cases = {  # appid -> (route, attempts the server sees, recovered?)
        ids[0]: (jpeg(0), 1, True),
        ids[1]: (_fail_first(1, too_many_requests, jpeg(1)), 2, True),
        ids[2]: (too_many_requests, 3, False),
        ids[3]: (_fail_first(2, cut_body(jpeg(3)), jpeg(3)), 3, True),
        ids[4]: (cut_body(jpeg(4)), 3, False),
        ids[5]: (cut_body(jpeg(5), reset=True), 3, False),
        ids[6]: (_fail_first(1, stall(release), jpeg(6)), 2, True),
        ids[7]: (stall(release), 3, False),
        ids[8]: (stall(release, jpeg(8)), 3, False),
        ids[9]: (jpeg(9), 1, True),
    }
    apps = {a: APPS[a] for a in cases}
    with serve({banner_path(a): route for a, (route, _, _) in cases.items()}) as server:
        _quiet(server)
        try:
            start = time.monotonic()
            report = download_banners(tmp_path, app_list=apps, host=server.url, processes=1, threads=4,
                                      timeout=TIMEOUT, retries=RETRIES, progress=False, engine=engine)
            seconds = time.monotonic() - start
            attempts = {a: len(server.gets(banner_path(a))) for a in cases}
        finally:
            release.set()

    assert attempts == {a: n for a, (_, n, _) in cases.items()}  # each failure retried, each success fetched once more
    recovered = {a for a, (_, _, ok) in cases.items() if ok}
    content = _shards(tmp_path)
    assert set(content) == recovered and all(content[a][0] == APPS[a] for a in recovered)
    assert (report.requested, report.downloaded, report.not_found, report.pending) == (10, len(recovered), 0, 0)
    failures = dict(report.failures)
    assert failures.pop("HTTP Error 429: Too Many Requests") == 1
    assert failures.pop("timed out") == 2  # no answer at all, and a body that stops coming
    # The cut bodies: an IncompleteRead for the hang-up; the reset one may surface as either, depending on timing.
    assert sum(failures.values()) == 2 and all(re.search(r"IncompleteRead|reset by peer", r) for r in failures), failures
    # 3 timed-out attempts of 1 s for the slowest banner (+ the light engine's backoff), plus img2dataset's start-up
    assert seconds < 60, seconds


def test_a_trickling_banner_ends_in_bounded_time(tmp_path):
    """A server that keeps sending a byte now and then never trips a read timeout: the light engine still ends each
    attempt after 3 x timeout. (img2dataset's urllib has no such bound, so it is not tested here.)"""
    release = threading.Event()
    data = jpeg(7)

    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for byte in data:
            if release.wait(0.2):
                break
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
        handler.close_connection = True

    appid = sorted(APPS, key=int)[0]
    with serve({banner_path(appid): trickle}) as server:
        _quiet(server)
        try:
            start = time.monotonic()
            report = download_banners(tmp_path, appids=[appid], host=server.url, threads=1, timeout=TIMEOUT,
                                      retries=1, progress=False)
            seconds = time.monotonic() - start
            attempts = len(server.gets(banner_path(appid)))
        finally:
            release.set()
    assert (report.downloaded, report.failures, attempts) == (0, {"timed out": 1}, 2)
    assert seconds < 2 * 3 * TIMEOUT + download._MAX_WAIT, seconds
