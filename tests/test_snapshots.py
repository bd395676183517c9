"""Published snapshots from a local mirror: each one's layout, a first transfer cut halfway, resume, cache,
reading every banner with its app id, and embedding it through the CLI.

The archives are synthetic, built in the layout each release was made with: dino-2021 a tar.gz of
``{appid}.jpg``; dinov2-2023 two tar.gz parts of img2dataset's "files" output (``images/00000/000000012.jpg``
+ JSON with the URL) plus ``apps.json``, the list of app ids the sample numbers index; bit-2021 a plain tar
of img2dataset webdataset shards.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.parse

import pytest
from conftest import APPS, TINY_ARCH, draw_banner
from test_archives import looks_like, read_all, tar_bytes
from test_download import closed_port_url, ranged_file, serve

from bannermatch import snapshots
from bannermatch.cli import main
from bannermatch.errors import BannermatchError
from bannermatch.snapshots import SNAPSHOTS, SnapshotUnavailable, fetch_snapshot, get_snapshot
from bannermatch.sources import open_source

IDS = sorted(APPS, key=int)  # 20 real app ids; banner i of a snapshot is draw_banner(int(appid))


def jpeg(appid: str, size) -> bytes:
    buf = io.BytesIO()
    draw_banner(int(appid)).resize(size).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def sample_json(appid: str) -> bytes:
    return json.dumps({"url": f"https://cdn.cloudflare.steamstatic.com/steam/apps/{appid}/library_600x900.jpg",
                       "status": "success"}).encode()


def build(name: str) -> dict[str, bytes]:
    """{file name: bytes} of a small snapshot in the layout of the real one."""
    if name == "dino-2021":
        return {"resized_vertical_steam_banners_v2.tar.gz": tar_bytes(
            {f"data/resized_vertical_steam_banners/{a}.jpg": jpeg(a, (224, 224)) for a in IDS[:8]}, "w:gz")}
    if name == "dinov2-2023":
        # img2dataset's sample number is 10,000 x shard + position: the index in GetAppList's sorted ids
        app_list = [9_000_000 + n for n in range(10_006)]  # most apps have no vertical banner: no sample
        samples = {"A": range(1, 7), "B": range(10_000, 10_006)}
        for n, appid in zip([*samples["A"], *samples["B"]], IDS[:12]):
            app_list[n] = int(appid)
        parts = {}
        for part, numbers in samples.items():
            members = {}
            for n in numbers:
                folder, key, appid = f"images/{n // 10_000:05d}", f"{n:09d}", str(app_list[n])
                members[f"{folder}/{key}.jpg"] = jpeg(appid, (224, 336))
                if part == "A":  # part B's samples lost their JSON: the app id list places them
                    members[f"{folder}/{key}.json"] = sample_json(appid)
                members[f"{folder}/{key}.txt"] = b""
            parts[f"images_part{part}.tar.gz"] = tar_bytes(members, "w:gz")
        return {**parts, "apps.json": json.dumps(app_list).encode()}
    shards = {}
    for shard in range(2):
        members = {}
        for i, appid in enumerate(IDS[6 * shard:6 * shard + 6]):
            key = f"{shard:05d}{i:04d}"
            members |= {f"{key}.jpg": jpeg(appid, (256, 384)), f"{key}.json": sample_json(appid), f"{key}.txt": b""}
        shards[f"images/{shard:05d}.tar"] = tar_bytes(members)
        shards[f"images/{shard:05d}_stats.json"] = b"{}"
        shards[f"images/{shard:05d}.parquet"] = b"PAR1"
    return {"steam_webdataset.tar": tar_bytes(shards)}


def expected_ids(name: str) -> list[str]:
    return {"dino-2021": IDS[:8], "dinov2-2023": IDS[:12], "bit-2021": IDS[:12]}[name]


def routes_for(name: str, files: dict[str, bytes], cut: bool) -> dict:
    return {urllib.parse.urlparse(url).path: ranged_file(files[n], len(files[n]) // 2 if cut else None)
            for url, n in zip(SNAPSHOTS[name].urls, SNAPSHOTS[name].files)}


def test_registry():
    assert snapshots.NEWEST == "dinov2-2023"
    assert get_snapshot("dino-2021").geometry == "square" and get_snapshot("bit-2021").geometry == "keep_ratio"
    assert SNAPSHOTS["dinov2-2023"].files == ["images_partA.tar.gz", "images_partB.tar.gz", "apps.json"]
    with pytest.raises(BannermatchError, match="unknown snapshot 'dino'; choose one of dinov2-2023, dino-2021, bit-2021"):
        get_snapshot("dino")
    with pytest.raises(BannermatchError, match="squashed to 224x224.*--preprocess keep"):
        get_snapshot("dino-2021").check_preprocess("keep")
    get_snapshot("dino-2021").check_preprocess("crop")
    get_snapshot("dinov2-2023").check_preprocess("keep")


@pytest.mark.parametrize("name", list(SNAPSHOTS))
def test_fetch_resumes_caches_and_reads_every_banner(name, tmp_path, tiny_weights):
    files = build(name)
    dest = tmp_path / name
    with serve(routes_for(name, files, cut=True)) as server:
        paths = fetch_snapshot(name, dest, mirror=server.url, progress=False)
        gets = server.gets()
        assert fetch_snapshot(name, dest, mirror=server.url, progress=False) == paths
        assert len(server.gets()) == len(gets)  # cached: no request
    assert [p.name for p in paths] == SNAPSHOTS[name].files
    assert all(p.read_bytes() == files[p.name] for p in paths)
    for path in paths:  # each transfer was cut halfway, then resumed from there
        mine = [headers for _, url, headers in gets if url.endswith("/" + path.name)]
        assert len(mine) == 2 and "Range" not in mine[0] and mine[1]["Range"] == f"bytes={len(files[path.name]) // 2}-"

    source = open_source(dest)
    assert sorted(source.keys, key=int) == expected_ids(name)
    images = read_all(source)
    assert all(looks_like(images[a], int(a)) for a in expected_ids(name))
    assert not source.report.skipped and not source.report.duplicates

    arch = ",".join(f"{k}={v}" for k, v in TINY_ARCH.items())
    proc = subprocess.run([sys.executable, "-m", "bannermatch.cli", "embed", str(dest), "--model", "dino_vits16",
                           "--arch", arch, "--weights", str(tiny_weights), "--store", str(tmp_path / "store"),
                           "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.startswith(f"{len(expected_ids(name))} banners embedded")


def test_names_come_from_an_apps_json_beside_the_snapshot(tmp_path):
    files = build("dino-2021")
    with serve(routes_for("dino-2021", files, cut=False)) as server:
        fetch_snapshot("dino-2021", tmp_path, mirror=server.url, progress=False)
    (tmp_path / "apps.json").write_text(json.dumps(APPS))
    assert open_source(tmp_path).names == {a: APPS[a] for a in IDS[:8]}


def test_cli_download_snapshot_through_the_mirror_variable(tmp_path, monkeypatch, capsys):
    files = build("bit-2021")
    with serve(routes_for("bit-2021", files, cut=False)) as server:
        monkeypatch.setenv(snapshots.MIRROR_ENV, server.url)
        assert main(["download", str(tmp_path / "bit"), "--snapshot", "bit-2021", "--quiet"]) == 0
    assert f"embed it with `bannermatch embed {tmp_path / 'bit'}`" in capsys.readouterr().out
    assert (tmp_path / "bit" / "steam_webdataset.tar").read_bytes() == files["steam_webdataset.tar"]
    assert main(["download", str(tmp_path / "x"), "--snapshot", "bit-2021", "--appids", "10"]) == 2


def test_unreachable_missing_or_wrong_snapshots_are_snapshot_unavailable(tmp_path):
    with pytest.raises(SnapshotUnavailable, match="dino-2021 snapshot is unavailable: cannot reach"):
        fetch_snapshot("dino-2021", tmp_path, mirror=closed_port_url(), progress=False)
    with serve({}) as server, pytest.raises(SnapshotUnavailable, match="unavailable: cannot download .*HTTP 404"):
        fetch_snapshot("dino-2021", tmp_path, mirror=server.url, progress=False)
    page = b"<html>moved</html>"
    path = urllib.parse.urlparse(SNAPSHOTS["dino-2021"].urls[0]).path
    with serve({path: ranged_file(page)}) as server, pytest.raises(SnapshotUnavailable, match="is damaged.*run again"):
        fetch_snapshot("dino-2021", tmp_path, mirror=server.url, progress=False)
    assert not list(tmp_path.iterdir())  # the bad file is gone, so the next run downloads it anew


def test_a_snapshot_missing_a_part_says_so(tmp_path):
    files = build("dinov2-2023")
    with serve(routes_for("dinov2-2023", files, cut=False)) as server:
        fetch_snapshot("dinov2-2023", tmp_path, mirror=server.url, progress=False)
    (tmp_path / "images_partB.tar.gz").unlink()
    source = open_source(tmp_path)
    assert len(source) == 6
    assert source.report.skipped == [(str(tmp_path), f"{tmp_path} lacks images_partB.tar.gz of the dinov2-2023 snapshot: "
                                      f"run `bannermatch download --snapshot dinov2-2023 {tmp_path}` again")]


def test_keep_on_the_squashed_snapshot_is_refused_in_one_line(tmp_path, tiny_weights):
    with serve(routes_for("dino-2021", build("dino-2021"), cut=False)) as server:
        fetch_snapshot("dino-2021", tmp_path / "dino-2021", mirror=server.url, progress=False)
    arch = ",".join(f"{k}={v}" for k, v in TINY_ARCH.items())
    proc = subprocess.run([sys.executable, "-m", "bannermatch.cli", "embed", str(tmp_path / "dino-2021"),
                           "--model", "dino_vits16", "--arch", arch, "--weights", str(tiny_weights), "--preprocess",
                           "keep", "--store", str(tmp_path / "store"), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "dino-2021 snapshot holds banners squashed to 224x224" in proc.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_first_run_reads_the_newest_snapshot_then_fetches_only_games_added_since(tmp_path, tiny_weights, monkeypatch,
                                                                                 capsys):
    """`bannermatch run` on a fresh machine: the snapshot (resumed after a cut), Steam's list, and CDN requests only
    for app ids above the snapshot's newest; a second run asks nothing; --update asks only for what is new."""
    from test_download import banner_path

    from bannermatch import download, steam

    in_snapshot = expected_ids("dinov2-2023")  # the 12 lowest ids
    added = [a for a in IDS if a not in in_snapshot]  # 8 games released since, one of them without a banner
    old_404 = "5"  # listed by Steam, older than the snapshot, no banner in it: never requested
    listed = [{"appid": int(a), "name": APPS.get(a, "old demo")} for a in [*IDS, old_404]]
    cdn_routes = {banner_path(a): jpeg(a, (300, 450)) for a in added[1:]}
    monkeypatch.delenv(steam.API_KEY_ENV, raising=False)
    monkeypatch.setattr(download, "SAMPLES_PER_SHARD", 4)
    images = tmp_path / "banners"
    common = ["run", "--images", str(images), "--model", "dino_vits16", "--arch", "embed_dim=48,depth=4,num_heads=3",
              "--weights", str(tiny_weights), "--store", str(tmp_path / "store"), "--device", "cpu", "-k", "3",
              "--out", str(tmp_path / "grid.png"), "--quiet"]
    with serve(routes_for("dinov2-2023", build("dinov2-2023"), cut=True)) as mirror, \
            serve({"/ISteamApps/GetAppList/v2/": json.dumps({"applist": {"apps": listed}}).encode()}) as api, \
            serve(cdn_routes) as cdn:
        monkeypatch.setenv(snapshots.MIRROR_ENV, mirror.url)
        monkeypatch.setattr(steam, "STEAM_API", api.url)
        assert main([*common, "--host", cdn.url]) == 0
        fetched = sorted((path.split("/")[-2] for _, path, _ in cdn.gets("/steam/apps/")), key=int)
        assert fetched == added  # nothing the snapshot holds, nothing older than it
        assert len(api.gets("GetAppList")) == 1
        printed = capsys.readouterr().out
        assert "top-3 matches of 19 banners" in printed  # 12 from the snapshot + 7 from the CDN

        seen = (len(mirror.gets()), len(api.gets()), len(cdn.gets()))
        assert main([*common, "--host", cdn.url]) == 0  # complete: not one request
        assert (len(mirror.gets()), len(api.gets()), len(cdn.gets())) == seen
        assert main([*common, "--host", cdn.url, "--update"]) == 0  # Steam's list again; the 404 is recent
        assert len(api.gets("GetAppList")) == 2 and len(cdn.gets()) == seen[2]
    source = open_source(images)
    assert sorted(source.keys, key=int) == sorted([*in_snapshot, *added[1:]], key=int)
    assert source.names["227300"] == "Euro Truck Simulator 2"  # named although the snapshot carries no names


def test_an_unreachable_snapshot_falls_back_to_the_cdn_in_one_line(tmp_path, monkeypatch, caplog):
    from test_download import banner_path

    from bannermatch.collection import get_banners

    monkeypatch.setenv(snapshots.MIRROR_ENV, closed_port_url())
    with serve({banner_path(a): jpeg(a, (300, 450)) for a in IDS[:3]}) as cdn:
        get_banners(tmp_path / "banners", app_list={a: APPS[a] for a in IDS[:3]}, host=cdn.url, progress=False)
    lines = [r.getMessage() for r in caplog.records if "snapshot" in r.getMessage()]
    assert len(lines) == 1 and "downloading the banners from the Steam CDN instead" in lines[0]
    assert sorted(open_source(tmp_path / "banners").keys, key=int) == IDS[:3]
