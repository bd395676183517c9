"""Banner download: app lists, both engines (light, and the real img2dataset) against a local CDN, the resumable
archive fetch, the CLI.

Every network call goes to HTTP servers these tests start on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import APPS, draw_banner

from bannermatch import download, steam
from bannermatch.cli import main
from bannermatch.download import REPORT_FILE, URL_TABLE, download_banners
from bannermatch.errors import BannermatchError
from bannermatch.fetch import fetch_archive
from bannermatch.sources import open_source

TIMEOUT = 1  # seconds; the slow banner answers after SLOW_DELAY
SLOW_DELAY = 2.5


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    draw_banner(seed).save(buf, "JPEG", quality=95)
    return buf.getvalue()


class Server:
    """A threaded HTTP server; ``routes[path]`` is bytes (200), an int (status), or a callable(handler)."""

    def __init__(self, routes):
        self.routes = routes
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server.record(self)
                self.send_response(404)
                self.end_headers()

            def do_GET(self):
                server.record(self)
                route = server.routes.get(urllib.parse.urlsplit(self.path).path, 404)
                if callable(route):
                    route(self)
                elif isinstance(route, int):
                    self.send_error(route)
                else:
                    send(self, route)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def record(self, handler):
        with self.lock:
            self.requests.append((handler.command, handler.path, dict(handler.headers)))

    def gets(self, path_part: str = "") -> list[tuple[str, str, dict]]:
        with self.lock:
            return [r for r in self.requests if r[0] == "GET" and path_part in r[1]]


def send(handler, body: bytes, status=200, headers=()):
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in headers:
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


@contextmanager
def serve(routes):
    server = Server(routes)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def banner_path(appid) -> str:
    return urllib.parse.urlsplit(steam.banner_url(appid, "http://x")).path


# ------------------------------------------------------------------------------------------ app lists

def test_app_list_shapes_give_the_same_mapping(tmp_path):
    records = [{"appid": 227300, "name": "Euro Truck Simulator 2"}, {"appid": 10, "name": "Counter-Strike"}]
    expected = {"227300": "Euro Truck Simulator 2", "10": "Counter-Strike"}
    assert steam.parse_app_list({"applist": {"apps": records}}) == expected
    assert steam.parse_app_list({"response": {"apps": records}}) == expected
    assert steam.parse_app_list({"227300": "Euro Truck Simulator 2", "10": "Counter-Strike"}) == expected

    bad = tmp_path / "bad.json"
    bad.write_text('{"227300": "Euro Truck')
    with pytest.raises(BannermatchError, match="not valid JSON"):
        download_banners(tmp_path / "out", app_list=bad, host="http://127.0.0.1:9")
    with pytest.raises(BannermatchError, match="unrecognised app list"):
        download_banners(tmp_path / "out", app_list={"games": ["x"]}, host="http://127.0.0.1:9")
    with pytest.raises(BannermatchError, match="must be integers"):
        download_banners(tmp_path / "out", appids=["227300", "../etc"], host="http://127.0.0.1:9")
    with pytest.raises(BannermatchError, match="unknown engine 'curl'; choose one of light, img2dataset"):
        download_banners(tmp_path / "out", appids=["10"], engine="curl")
    with pytest.raises(BannermatchError, match="distributor is img2dataset's: add --engine img2dataset"):
        download_banners(tmp_path / "out", appids=["10"], distributor="ray")


def test_fetch_app_list_from_getapplist_v2(monkeypatch):
    monkeypatch.delenv(steam.API_KEY_ENV, raising=False)
    apps = [{"appid": 570, "name": "Dota 2"}, {"appid": 10, "name": "Counter-Strike"}, {"appid": 5, "name": " "}]
    with serve({"/ISteamApps/GetAppList/v2/": json.dumps({"applist": {"apps": apps}}).encode()}) as server:
        assert steam.fetch_app_list(server.url, key=None) == {"570": "Dota 2", "10": "Counter-Strike"}


def test_fetch_app_list_asks_istoreservice_for_games_only_with_a_key(monkeypatch):
    def store_pages(handler):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        assert query["key"] == ["SECRET"] and query["include_games"] == ["true"]
        if query["last_appid"] == ["0"]:
            page = {"apps": [{"appid": 10, "name": "Counter-Strike"}], "have_more_results": True, "last_appid": 10}
        else:
            assert query["last_appid"] == ["10"]
            page = {"apps": [{"appid": 570, "name": "Dota 2"}]}
        send(handler, json.dumps({"response": page}).encode())

    routes = {"/ISteamApps/GetAppList/v2/": 404, "/IStoreService/GetAppList/v1/": store_pages}
    with serve(routes) as server:
        monkeypatch.delenv(steam.API_KEY_ENV, raising=False)
        with pytest.raises(BannermatchError, match=f"HTTP 404.*set {steam.API_KEY_ENV}"):
            steam.fetch_app_list(server.url)
        assert not server.gets("IStoreService")
        monkeypatch.setenv(steam.API_KEY_ENV, "SECRET")
        v2_requests = len(server.gets("ISteamApps"))
        assert steam.fetch_app_list(server.url) == {"10": "Counter-Strike", "570": "Dota 2"}
        assert len(server.gets("IStoreService")) == 2 and len(server.gets("ISteamApps")) == v2_requests


def test_shipped_app_list_is_package_data(tmp_path, steam_names):
    """The 2021 list ships in the wheel, so names work offline without ../shared."""
    assert len(steam_names) == 29982 and steam_names["227300"] == "Euro Truck Simulator 2"
    shared = Path(__file__).resolve().parents[2] / "shared" / "steam" / "vertical_banner_apps_2021.json"
    if shared.is_file():
        assert steam_names == steam.load_app_names(shared)
    root, src = Path(steam.__file__).resolve().parents[1], tmp_path / "src"  # built from a copy: no build/ left here
    shutil.copytree(root / "bannermatch", src / "bannermatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("bannermatch-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = json.loads(zf.read(f"bannermatch/data/{steam.SHIPPED_APP_LIST}"))
    assert steam.parse_app_list(shipped) == steam_names


def test_first_download_defaults_to_the_shipped_list(tmp_path, monkeypatch, steam_names):
    """No app list: the shipped 29,982 games (each had a vertical banner), not ~200k apps from the Web API. An
    unreachable CDN leaves nothing behind: a saved list is what a later run finishes first (#22)."""
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with serve({}) as api, serve({}) as cdn:
        monkeypatch.setattr(steam, "STEAM_API", api.url)
        with pytest.raises(BannermatchError, match="unreachable"):  # the list is there, the CDN is not
            download_banners(tmp_path, host=closed_port_url(), timeout=2, progress=False)
        assert not list(tmp_path.iterdir())
        monkeypatch.setattr(download, "_run_light", ctrl_c)  # reached, then stopped at its first banner
        with pytest.raises(KeyboardInterrupt):
            download_banners(tmp_path, host=cdn.url, progress=False)
        assert not api.requests
    table = pq.read_table(tmp_path / URL_TABLE).to_pydict()
    assert len(table["appid"]) == 29982 and dict(zip(table["appid"], table["name"])) == steam_names
    assert table["appid"] == sorted(steam_names, key=int)
    assert steam.load_app_names(tmp_path / steam.APP_NAMES_FILE) == {a: n for a, n in steam_names.items() if n}


def test_unreachable_network_is_one_clear_error(tmp_path):
    dead = closed_port_url()
    with pytest.raises(BannermatchError, match="network seems unreachable.*--app-list FILE.*--archive PATH.*embed"):
        steam.fetch_app_list(dead, timeout=2)
    with pytest.raises(BannermatchError, match="network seems unreachable"):
        download_banners(tmp_path / "out", app_list=APPS, host=dead, timeout=2, progress=False)
    with pytest.raises(BannermatchError, match="network seems unreachable"):
        fetch_archive(f"{dead}/banners.tar.gz", tmp_path, timeout=2, progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))


# ------------------------------------------------------------------------------------------ both engines

GOOD = ["10", "70", "220", "400", "570", "227300"]  # served as 300x450 JPEGs
MISSING = ["440", "620"]  # 404: no vertical banner
TRUNCATED, NOT_IMAGE, SLOW = "730", "8930", "105600"


def slow_banner(handler):
    time.sleep(SLOW_DELAY)
    send(handler, jpeg(99))


@pytest.fixture(scope="module")
def cdn():
    routes = {banner_path(a): jpeg(i) for i, a in enumerate(GOOD)}
    routes[banner_path(TRUNCATED)] = jpeg(50)[:4000]
    routes[banner_path(NOT_IMAGE)] = b"<html><body>Steam is down for maintenance</body></html>"
    routes[banner_path(SLOW)] = slow_banner
    with serve(routes) as server:
        yield server


def test_download_writes_shards_report_and_resumes(tmp_path, cdn, monkeypatch, engine):
    monkeypatch.setattr(download, "SAMPLES_PER_SHARD", 4)  # 11 apps -> 3 shards
    apps = {a: APPS[a] for a in GOOD + MISSING + [TRUNCATED, NOT_IMAGE, SLOW]}
    out = tmp_path / "banners"
    run = dict(host=cdn.url, processes=1, threads=4, timeout=TIMEOUT, retries=1, progress=False, engine=engine)
    missing_gets = len(cdn.gets(f"/{MISSING[0]}/"))  # the CDN serves every engine's run
    report = download_banners(out, app_list=apps, **run)

    source = open_source(out)
    assert sorted(source.keys, key=int) == sorted(GOOD, key=int)
    assert source.names == {a: APPS[a] for a in GOOD}
    assert {image.size for _, image in source} == {(256, 384)}

    assert (report.requested, report.downloaded, report.not_found, report.pending, report.shards) == (11, 6, 2, 0, 3)
    # The truncated JPEG and the HTML page fail to decode; the slow banner times out.
    assert report.failures == {"Image decoding error": 2, "timed out": 1}
    assert report.new_downloads == 6 and report.images_per_second > 0
    assert json.loads((out / REPORT_FILE).read_text()) == report.to_dict()
    assert not list(out.glob("*.aside")) and not (out / "_tmp").exists() and not list(out.glob("*.tmp*"))
    assert steam.load_app_names(out / steam.APP_NAMES_FILE) == apps
    table = pq.read_table(out / URL_TABLE)
    assert str(table.schema.field("appid").type) == "string"
    assert table.column("url").to_pylist()[0] == steam.banner_url(10, cdn.url)
    # img2dataset retries a 404 like any failure; the light engine takes it as the final answer it is
    assert len(cdn.gets(f"/{MISSING[0]}/")) - missing_gets == (2 if engine == "img2dataset" else 1)
    assert "6 of 11 banners in 3 shards" in report.summary() and "2 without a vertical banner" in report.summary()
    state = json.loads((out / download.STATE_FILE).read_text())
    assert set(state["not_found"]) == set(MISSING) and set(state["failed"]) == {TRUNCATED, NOT_IMAGE, SLOW}
    assert state["failed"][SLOW][1] == "timed out" and all(t <= time.time() for t in state["not_found"].values())

    # A rerun finds every shard done: no request at all, same totals.
    seen = len(cdn.requests)
    again = download_banners(out, app_list=apps, **run)
    assert len(cdn.requests) == seen
    assert (again.downloaded, again.new_downloads, again.shards) == (6, 0, 3)

    # An unfinished shard (no stats file) is downloaded again, alone; the saved list resumes without an app list.
    (out / "00001_stats.json").unlink()
    banner_gets = len(cdn.gets("/steam/apps/"))
    resumed = download_banners(out, **run)
    shard_1 = sorted(apps, key=int)[4:8]
    requested_again = {path.split("/")[-2] for _, path, _ in cdn.gets("/steam/apps/")[banner_gets:]}
    assert requested_again == set(shard_1)
    assert (resumed.downloaded, resumed.shards, resumed.new_downloads) == (6, 3, sum(a in GOOD for a in shard_1))
    assert sorted(open_source(out).keys, key=int) == sorted(GOOD, key=int)
    assert steam.load_app_names(out / steam.APP_NAMES_FILE) == apps  # set aside while img2dataset ran, then back

    with pytest.raises(BannermatchError, match="another app list.*--update"):
        download_banners(out, appids=["10"], **run)


def _layout(out: Path) -> dict:
    """What a shard folder looks like, without the bytes: member names, JSON fields, stats and table columns."""
    with tarfile.open(out / "00000.tar") as tar:
        members = tar.getmembers()
        meta = json.loads(tar.extractfile(next(m for m in members if m.name.endswith(".json"))).read())
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "members": sorted(m.name for m in members),  # img2dataset writes them in the order they arrive
        "meta": sorted(meta),
        "stats": sorted(json.loads((out / "00000_stats.json").read_text())),
        "status columns": sorted(pq.read_schema(out / "00000.parquet").names),
        "url table": pq.read_schema(out / URL_TABLE).names,
    }


@pytest.mark.skipif(importlib.util.find_spec("img2dataset") is None, reason="img2dataset not installed")
def test_both_engines_write_the_same_layout(tmp_path, cdn, monkeypatch):
    """Same files, member names, metadata fields, stats and status columns; the same banners up to the resizer."""
    monkeypatch.setattr(download, "SAMPLES_PER_SHARD", 4)
    apps = {a: APPS[a] for a in GOOD[:3] + MISSING[:1]}
    run = dict(app_list=apps, host=cdn.url, processes=1, threads=2, timeout=5, retries=0, progress=False)
    light, heavy = tmp_path / "light", tmp_path / "img2dataset"
    download_banners(light, engine="light", **run)
    download_banners(heavy, engine="img2dataset", **run)
    assert _layout(light) == _layout(heavy)
    assert {"appid", "name", "url"} <= set(_layout(light)["meta"])
    a, b = ({key: image for key, image in open_source(out)} for out in (light, heavy))
    assert a.keys() == b.keys() == set(GOOD[:3])
    for key in a:  # Pillow's box filter against OpenCV's area interpolation, both JPEG q95
        assert a[key].size == b[key].size == (256, 384)
        diff = np.abs(np.asarray(a[key], np.int16) - np.asarray(b[key], np.int16))
        assert diff.mean() < 3, (key, diff.mean())


def test_cli_download(tmp_path, cdn, capsys, engine):
    out = tmp_path / "cli"
    argv = ["download", str(out), "--appids", "10", "440", "--host", cdn.url, "--processes", "1", "--threads", "2",
            "--timeout", "2", "--retries", "0", "--engine", engine]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 banners" in printed and "1 without a vertical banner" in printed
    assert open_source(out).keys == ["10"]

    assert main(["download", str(tmp_path / "x"), "--host", closed_port_url(), "--appids", "10", "--timeout", "2",
                 "--engine", engine]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bannermatch: error: cannot reach") and "\n" not in err


# ------------------------------------------------------------------------------------------ the archive

@pytest.fixture(scope="module")
def archive_bytes():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i, appid in enumerate(["10", "70", "220"]):
            data = jpeg(i)
            info = tarfile.TarInfo(f"data/resized_vertical_steam_banners/{appid}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ranged_file(body: bytes, cut_first_at: int | None = None, honour_range: bool = True):
    """Serves ``body`` with Range support; the first full answer stops after ``cut_first_at`` bytes."""
    cuts = [cut_first_at] if cut_first_at else []

    def handle(handler):
        start = 0
        if "Range" in handler.headers and honour_range:
            start = int(handler.headers["Range"].removeprefix("bytes=").split("-")[0])
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(len(body) - start))
        handler.end_headers()
        if cuts:  # announce everything, send part of it, hang up
            handler.wfile.write(body[start:cuts.pop()])
            handler.close_connection = True
            return
        handler.wfile.write(body[start:])

    return handle


def test_archive_download_resumes_with_range_after_a_cut(tmp_path, archive_bytes):
    cut = len(archive_bytes) // 2
    with serve({"/releases/resized_vertical_steam_banners_v2.tar.gz": ranged_file(archive_bytes, cut)}) as server:
        path = fetch_archive(f"{server.url}/releases/resized_vertical_steam_banners_v2.tar.gz", tmp_path, progress=False)
        gets = server.gets()
    assert path == tmp_path / "resized_vertical_steam_banners_v2.tar.gz"
    assert path.read_bytes() == archive_bytes and not list(tmp_path.glob("*.part"))
    assert "Range" not in gets[0][2] and gets[1][2]["Range"] == f"bytes={cut}-" and len(gets) == 2
    assert open_source(path).keys == ["10", "70", "220"]
    assert fetch_archive(path, tmp_path / "unused") == path  # a local archive is read in place


@pytest.mark.parametrize("honour_range", [True, False])
def test_archive_download_continues_a_part_file_from_an_earlier_process(tmp_path, archive_bytes, honour_range):
    (tmp_path / "banners.tar.gz.part").write_bytes(archive_bytes[:1000])
    with serve({"/banners.tar.gz": ranged_file(archive_bytes, honour_range=honour_range)}) as server:
        path = fetch_archive(f"{server.url}/banners.tar.gz", tmp_path, progress=False)
        assert [r[2].get("Range") for r in server.gets()] == ["bytes=1000-"]
    assert path.read_bytes() == archive_bytes  # appended to the .part, or restarted when the server ignores Range


def test_archive_errors_are_one_line(tmp_path):
    with serve({}) as server:
        with pytest.raises(BannermatchError, match="HTTP 404"):
            fetch_archive(f"{server.url}/nothing.tar.gz", tmp_path, progress=False)
    with pytest.raises(BannermatchError, match="archive not found"):
        fetch_archive(tmp_path / "missing.tar.gz", tmp_path)


def test_cli_archive_with_names(tmp_path, archive_bytes, capsys):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"10": "Counter-Strike", "70": "Half-Life", "220": "Half-Life 2"}))
    out = tmp_path / "banners"
    with serve({"/v2/resized_vertical_steam_banners_v2.tar.gz": ranged_file(archive_bytes)}) as server:
        url = f"{server.url}/v2/resized_vertical_steam_banners_v2.tar.gz"
        assert main(["download", str(out), "--archive", url, "--app-list", str(names), "--quiet"]) == 0
    assert "archive ready" in capsys.readouterr().out
    source = open_source(out)  # the archive inside the default banner folder is found by `embed` as is
    assert source.names == {"10": "Counter-Strike", "70": "Half-Life", "220": "Half-Life 2"}
    assert main(["download", str(out), "--archive", url, "--appids", "10"]) == 2
