"""``bannermatch download --update`` against a fake Steam Web API and CDN on 127.0.0.1 that count requests: only app
ids the folder lacks are requested, old 404s and failures only once old enough, and new banners go into new shards."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import APPS
from test_download import banner_path, jpeg, serve

from bannermatch import download, steam
from bannermatch.cli import main
from bannermatch.download import STATE_FILE, URL_TABLE, download_banners
from bannermatch.errors import BannermatchError
from bannermatch.sources import open_source

SHARD = 4
IDS = sorted(APPS, key=int)
FIRST = IDS[:6]  # the first download: 2 shards, the second one half full
FIRST_404 = {IDS[1], IDS[4]}
ADDED = IDS[6:9]  # games Steam lists later
ADDED_404 = {IDS[7]}
ELSEWHERE = IDS[9]  # held in a snapshot: never requested
LATER = IDS[4]  # a 404 at first, given a banner since


def _served(cdn_routes, ids):
    for i, appid in enumerate(ids):
        cdn_routes[banner_path(appid)] = jpeg(200 + i)


def _mark(cdn) -> int:
    return len(cdn.gets("/steam/apps/"))


def _fetched(cdn, since: int) -> list[str]:
    """The app ids of the banners requested since ``_mark``."""
    return sorted((path.split("/")[-2] for _, path, _ in cdn.gets("/steam/apps/")[since:]), key=int)


def _shard_files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name[:5].isdigit()}


def table_ids(out) -> list[str]:
    return pq.read_table(out / URL_TABLE, columns=["appid"]).column("appid").to_pylist()


def test_update_requests_only_what_the_folder_lacks(tmp_path, monkeypatch, engine, capsys):
    monkeypatch.setattr(download, "SAMPLES_PER_SHARD", SHARD)
    monkeypatch.delenv(steam.API_KEY_ENV, raising=False)  # the keyless list
    listed = [{"appid": int(a), "name": APPS[a]} for a in FIRST + ADDED + [ELSEWHERE]]
    routes = {}
    _served(routes, [a for a in FIRST + ADDED + [ELSEWHERE] if a not in FIRST_404 | ADDED_404])
    out = tmp_path / "banners"
    run = dict(processes=1, threads=2, timeout=5, retries=0, progress=False, engine=engine)
    with serve({"/ISteamApps/GetAppList/v2/": json.dumps({"applist": {"apps": listed}}).encode()}) as api, \
            serve(routes) as cdn:
        monkeypatch.setattr(steam, "STEAM_API", api.url)
        first = download_banners(out, app_list={a: APPS[a] for a in FIRST}, host=cdn.url, **run)
        assert (first.downloaded, first.not_found, first.shards, first.update) == (4, 2, 2, {})
        assert not api.requests  # a first download with a list needs no Web API
        before = _shard_files(out)

        # Steam now lists three more games (one without a banner), and one the caller holds elsewhere.
        seen = _mark(cdn)
        report = download_banners(out, host=cdn.url, update=True, have=[ELSEWHERE], **run)
        assert _fetched(cdn, seen) == ADDED  # not the old 404s: checked less than 30 days ago
        assert len(api.gets("GetAppList")) == 1
        assert report.update == {"listed": 10, "new": 3, "rechecked": 0, "recheck_days": 30,
                                 "new_banners": {a: APPS[a] for a in ADDED if a not in ADDED_404}}
        assert (report.requested, report.downloaded, report.not_found, report.shards, report.new_downloads) == (9, 6, 3, 3, 2)
        after = _shard_files(out)
        assert {k: v for k, v in after.items() if k in before} == before  # finished shards untouched
        assert sorted(set(after) - set(before)) == ["00002.parquet", "00002.tar", "00002_stats.json"]  # a new shard
        table = pq.read_table(out / URL_TABLE).to_pydict()
        assert table["appid"] == FIRST + ["", ""] + ADDED  # blank rows fill the half shard: new ids start a new one
        source = open_source(out)
        assert sorted(source.keys, key=int) == sorted(set(FIRST + ADDED) - FIRST_404 - ADDED_404, key=int)
        assert source.names == {a: APPS[a] for a in source.keys}
        state = json.loads((out / STATE_FILE).read_text())
        assert sorted(state["not_found"], key=int) == sorted(FIRST_404 | ADDED_404, key=int) and state["failed"] == {}

        # Through the CLI, which knows nothing of the snapshot: the snapshot's game is all the folder lacks.
        argv = ["download", str(out), "--update", "--host", cdn.url, "--engine", engine, "--threads", "2", "--quiet"]
        seen = _mark(cdn)
        assert main(argv) == 0
        assert _fetched(cdn, seen) == [ELSEWHERE]
        assert "update: 10 apps listed, 1 never requested before, 0 re-checked (404 or failed over 30 days ago): " \
               f"1 new banners ({APPS[ELSEWHERE]})" in capsys.readouterr().out
        # At once again: nothing new, nothing old enough to re-check: no banner request at all.
        seen = _mark(cdn)
        assert main(argv) == 0
        assert _fetched(cdn, seen) == [] and ": 0 new banners" in capsys.readouterr().out

        # One 404 has a banner now: with --recheck-days 0, every 404 is asked again, and only they are.
        _served(cdn.routes, [LATER])
        seen = _mark(cdn)
        recheck = download_banners(out, host=cdn.url, update=True, recheck_days=0, **run)
        assert _fetched(cdn, seen) == sorted(FIRST_404 | ADDED_404, key=int)
        assert (recheck.update["new"], recheck.update["rechecked"], recheck.update["new_banners"]) == (0, 3, {LATER: APPS[LATER]})
        assert LATER in open_source(out).keys and LATER not in json.loads((out / STATE_FILE).read_text())["not_found"]
        assert (recheck.requested, recheck.downloaded, recheck.not_found) == (10, 8, 2)  # one count per app

        # An update cut short (its last shard unfinished) is finished by the next update before anything new.
        last = max(int(p.name[:5]) for p in out.glob("*_stats.json"))
        (out / f"{last:05d}_stats.json").unlink()
        seen = _mark(cdn)
        resumed = download_banners(out, host=cdn.url, update=True, **run)
        redone = {a for a in table_ids(out)[last * SHARD:(last + 1) * SHARD] if a}
        assert set(_fetched(cdn, seen)) == redone and resumed.pending == 0 and resumed.update["new"] == 0


def test_update_with_an_explicit_list_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "SAMPLES_PER_SHARD", SHARD)
    routes = {}
    _served(routes, IDS[:3])
    with serve(routes) as cdn:
        # an update of an empty folder fetches the whole given list
        report = download_banners(tmp_path, appids=IDS[:2], host=cdn.url, update=True, threads=2, progress=False)
        assert (report.downloaded, report.update["new"]) == (2, 2)
        seen = _mark(cdn)
        report = download_banners(tmp_path, appids=IDS[:3], host=cdn.url, update=True, threads=2, progress=False)
        assert _fetched(cdn, seen) == [IDS[2]] and report.update["new_banners"] == {IDS[2]: ""}
    with pytest.raises(BannermatchError, match="nothing to update"):
        download_banners(tmp_path / "empty", appids=[IDS[0]], host=cdn.url, update=True, have=[IDS[0]], progress=False)
    with pytest.raises(BannermatchError, match="recheck days at least 0"):
        download_banners(tmp_path, appids=[IDS[0]], update=True, recheck_days=-1)
