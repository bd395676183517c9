"""The collection's data layer (#22): snapshot parts, the CDN top-up and the user's own folders behind one index,
newest snapshot first, every conflict recorded, in app-id order; the snapshot a collection was made from never
mixed with another; an offline or interrupted run never makes the next one fetch what the snapshot holds; and
the modules that get the banners import each other in no circle.

Snapshots come from a mirror on 127.0.0.1 in their real layouts (``test_snapshots.build``), Steam's app list and
CDN from local servers; a CDN banner of app ``a`` is ``draw_banner(int(a) + CDN_SEED)``, so where a banner came
from shows in its pixels.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
from conftest import APPS
from test_archives import looks_like, read_all
from test_download import banner_path, closed_port_url, serve
from test_snapshots import IDS, build, jpeg, routes_for

import bannermatch
from bannermatch import download, snapshots, steam
from bannermatch.sources import open_source

CDN_SEED = 7  # CDN banners differ from the snapshots' banners of the same app


def cdn_jpeg(appid: str) -> bytes:
    return jpeg(str(int(appid) + CDN_SEED), (300, 450))


def steam_list(ids) -> bytes:
    return json.dumps({"applist": {"apps": [{"appid": int(a), "name": APPS[a]} for a in ids]}}).encode()


def came_from_cdn(image, appid: str) -> bool:
    return looks_like(image, int(appid) + CDN_SEED)


@pytest.fixture
def world(monkeypatch):
    """Both snapshots on a mirror, Steam listing the 20 apps, a CDN serving every one of them."""
    monkeypatch.delenv(steam.API_KEY_ENV, raising=False)
    monkeypatch.setattr(download, "SAMPLES_PER_SHARD", 4)
    mirror_routes = {**routes_for("dinov2-2023", build("dinov2-2023"), cut=False),
                     **routes_for("dino-2021", build("dino-2021"), cut=False)}
    with serve(mirror_routes) as mirror, serve({"/ISteamApps/GetAppList/v2/": steam_list(IDS)}) as api, \
            serve({banner_path(a): cdn_jpeg(a) for a in IDS}) as cdn:
        monkeypatch.setenv(snapshots.MIRROR_ENV, mirror.url)
        monkeypatch.setattr(steam, "STEAM_API", api.url)
        yield cdn


def cdn_requests(cdn) -> list[str]:
    return sorted((path.split("/")[-2] for _, path, _ in cdn.gets("/steam/apps/")), key=int)


def test_the_newest_snapshot_wins_every_conflict_is_recorded_and_ids_come_in_order(tmp_path, world, caplog):
    """A CDN part that holds apps of the snapshot too (a CDN-only run before the snapshot could be had): the
    snapshot's banners are used (`cdn/` used to be listed first and win), each conflict is recorded and logged."""
    folder = tmp_path / "banners"
    snapshots.fetch_snapshot("dinov2-2023", folder / "dinov2-2023", progress=False)  # IDS[:12]
    download.download_banners(folder / "cdn", {a: APPS[a] for a in IDS[8:16]}, host=world.url, progress=False)
    (folder / "mine").mkdir()  # a folder of the user's own, with its own app list: last
    (folder / "mine" / "apps.json").write_text(json.dumps({IDS[15]: APPS[IDS[15]], IDS[16]: APPS[IDS[16]]}))
    for a in IDS[15:17]:
        (folder / "mine" / f"{a}.jpg").write_bytes(jpeg(a, (300, 450)))
    caplog.set_level(logging.INFO)

    source = open_source(folder)
    assert source.keys == sorted(IDS[:17], key=int)
    images = read_all(source)
    assert all(looks_like(images[a], int(a)) for a in IDS[:12])  # the snapshot's own banners
    assert all(came_from_cdn(images[a], a) for a in IDS[12:16])
    assert looks_like(images[IDS[16]], int(IDS[16]))  # from `mine`, the only part that has it
    conflicts = [(key, where.split(":")[0]) for key, where in source.report.duplicates]
    assert sorted(conflicts) == sorted([(a, "00000.tar") for a in IDS[8:12]]
                                       + [(IDS[15], str(folder / "mine" / f"{IDS[15]}.jpg"))])
    warned = [r.getMessage() for r in caplog.records if "several parts" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("5 app ids are in several parts")

    from bannermatch.sources import index_collection

    index = index_collection(folder)
    assert [p.name for p in index.parts] == ["dinov2-2023", "cdn", "mine"]
    assert [index.part_of[a] for a in (IDS[0], IDS[9], IDS[12], IDS[15], IDS[16])] == [
        "dinov2-2023", "dinov2-2023", "cdn", "cdn", "mine"]
    assert {(key, kept) for key, kept, _ in index.conflicts} == {
        *((a, "dinov2-2023") for a in IDS[8:12]), (IDS[15], "cdn")}
    # adding a game never shifts the others: the new one takes its app-id place
    download.download_banners(folder / "cdn", {IDS[17]: APPS[IDS[17]]}, host=world.url, progress=False, update=True)
    assert [k for k in open_source(folder).keys if k != IDS[17]] == source.keys


def test_another_snapshot_replaces_the_first_in_the_collection_never_joins_it(tmp_path, world, caplog):
    """`run --snapshot dino-2021` after a default run used to mix the squashed 224x224 banners of one snapshot into
    the other's collection, silently; each run's collection is its snapshot plus the CDN's games added since."""
    from bannermatch.collection import get_banners

    folder = tmp_path / "banners"
    get_banners(folder, host=world.url, progress=False)  # dinov2-2023 (IDS[:12]), then IDS[12:] from the CDN
    assert cdn_requests(world) == IDS[12:]
    caplog.set_level(logging.INFO)

    get_banners(folder, snapshot="dino-2021", host=world.url, progress=False)  # IDS[:8], then the games since
    assert cdn_requests(world) == IDS[8:]  # IDS[8:12], added since 2021, fetched once
    source = open_source(folder)
    assert sorted(source.keys, key=int) == IDS
    assert not [e for e in source.entries if "dinov2-2023" in e.container]
    images = read_all(source)
    assert all(images[a].size == (224, 224) and looks_like(images[a], int(a)) for a in IDS[:8])
    assert all(came_from_cdn(images[a], a) for a in IDS[8:])
    left_out = [r.getMessage() for r in caplog.records if r.getMessage().startswith("left out")]
    assert left_out and all(str(folder / "dinov2-2023") in m and "dino-2021 snapshot" in m for m in left_out)

    get_banners(folder, host=world.url, progress=False)  # the default again: dinov2-2023 wins its apps back
    source = open_source(folder)
    assert not [e for e in source.entries if "dino-2021" in e.container]
    images = read_all(source)
    assert all(images[a].size == (224, 336) and looks_like(images[a], int(a)) for a in IDS[:12])
    assert sorted(k for k, _ in source.report.duplicates) == sorted(IDS[8:12])  # also on the CDN since the last run
    assert cdn_requests(world) == IDS[8:]  # nothing asked again


@pytest.mark.parametrize("first_run", ["offline", "interrupted"])
def test_a_run_that_did_not_get_the_snapshot_never_makes_the_next_fetch_what_it_holds(tmp_path, world, monkeypatch,
                                                                                      first_run):
    """The first run could not have the snapshot and fell back to the CDN, which was unreachable (offline) or was
    stopped at its first banner (Ctrl-C). The next run has the snapshot: it asks the CDN only for the games the
    snapshot lacks. It used to finish the first run's whole list first (with the shipped list, 29,982 banners)."""
    from bannermatch.collection import get_banners

    folder = tmp_path / "banners"
    with monkeypatch.context() as offline:
        offline.setenv(snapshots.MIRROR_ENV, closed_port_url())
        if first_run == "offline":
            with pytest.raises(steam.NetworkUnreachable):
                get_banners(folder, host=closed_port_url(), app_list={a: APPS[a] for a in IDS[:16]}, progress=False)
            assert not list(folder.rglob("banner_urls.parquet"))
        else:
            def ctrl_c(*args, **kwargs):
                raise KeyboardInterrupt

            offline.setattr(download, "_run_light", ctrl_c)
            with pytest.raises(KeyboardInterrupt):
                get_banners(folder, host=world.url, app_list={a: APPS[a] for a in IDS[:16]}, progress=False)
            assert (folder / "cdn" / "banner_urls.parquet").is_file()  # the interrupted list, to finish

    get_banners(folder, host=world.url, progress=False)
    assert cdn_requests(world) == IDS[12:]  # the snapshot holds IDS[:12]
    assert sorted(open_source(folder).keys, key=int) == IDS


def test_an_archive_given_as_the_collection_is_read_in_place(tmp_path):
    from bannermatch.collection import get_banners
    from bannermatch.errors import BannermatchError

    corpus = tmp_path / "corpus.tar"
    corpus.write_bytes(build("dino-2021")["resized_vertical_steam_banners_v2.tar.gz"])
    assert get_banners(corpus, progress=False) == corpus  # no snapshot folder inside a file, no request
    assert sorted(open_source(corpus).keys, key=int) == IDS[:8]
    with pytest.raises(BannermatchError, match="no such archive: .*missing.tar"):
        get_banners(tmp_path / "missing.tar", progress=False)
    assert not (tmp_path / "missing.tar").exists()


def test_the_modules_that_get_the_banners_import_each_other_in_no_circle():
    """download, snapshots and sources used to import each other in a circle (sources took download's file names,
    snapshots download's archive fetch, download the snapshot list); imports inside functions count too."""
    package = Path(bannermatch.__file__).parent
    graph = {}
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[path.stem] = imported

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and m in graph and reaches(m, goal, (*seen, m))) for m in graph[start])

    assert [m for m in graph if reaches(m, m)] == []
    assert graph["sources"] & {"download", "snapshots", "collection", "fetch"} == set()
    assert "get_banners" not in vars(download) and "fetch_archive" not in vars(download)


def test_a_snapshot_asked_for_while_steam_is_unreachable_is_the_collection_at_once(tmp_path, world, monkeypatch):
    """The games added since it cannot be listed: the new snapshot alone is the collection until a later run
    completes it, never the snapshot it replaced."""
    from bannermatch.collection import get_banners

    folder = tmp_path / "banners"
    get_banners(folder, host=world.url, progress=False)
    with monkeypatch.context() as offline:
        offline.setattr(steam, "STEAM_API", closed_port_url())
        get_banners(folder, snapshot="dino-2021", host=world.url, progress=False)
    source = open_source(folder)
    assert not [e for e in source.entries if "dinov2-2023" in e.container]
    assert sorted(source.keys, key=int) == [*IDS[:8], *IDS[12:]]  # the CDN's games are its games too
    get_banners(folder, snapshot="dino-2021", host=world.url, progress=False)  # Steam is back: completed
    assert cdn_requests(world) == IDS[8:]
    assert sorted(open_source(folder).keys, key=int) == IDS
