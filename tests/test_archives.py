"""Archives as users get them: banners at any depth, tars inside tars, duplicates, and damaged files.

Damaged archives go through the CLI as a user would run it: an exit code, one stderr line, no traceback.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import TINY_ARCH, draw_banner

from bannermatch.errors import BannermatchError
from bannermatch.sources import SkipImage, Unreadable, decode_image, open_source


def jpeg(seed: int, size=(300, 450)) -> bytes:
    buf = io.BytesIO()
    draw_banner(seed, size).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def looks_like(image, seed: int) -> bool:
    expected = draw_banner(seed).resize(image.size)
    return np.abs(np.asarray(image, float) - np.asarray(expected, float)).mean() < 10


def read_all(source) -> dict:
    return {key: image for key, image in source}


# ------------------------------------------------------------------------------------------ finding banners

def test_a_key_found_twice_keeps_the_first_in_sorted_order(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(tar_bytes({"z/100.jpg": jpeg(1), "a/100.jpg": jpeg(2), "m/200.jpg": jpeg(3)}))
    source = open_source(path)
    assert source.keys == ["100", "200"]
    assert source.entries[0].member == "a/100.jpg"  # archive order would have kept z/100.jpg
    assert source.report.duplicates == [("100", "a.tar:z/100.jpg")]
    assert looks_like(read_all(source)["100"], 2)


@pytest.mark.parametrize("outer_mode,inner_mode", [("w", "w"), ("w", "w:gz"), ("w:gz", "w"), ("w:xz", "w:gz")])
def test_tars_inside_tars_are_read_in_place(tmp_path, outer_mode, inner_mode):
    suffix = {"w": ".tar", "w:gz": ".tar.gz", "w:xz": ".tar.xz"}
    def shard(s):  # img2dataset's webdataset samples: the app id is only in the URL of the sample's JSON
        members = {}
        for i in (0, 1):
            url = f"https://cdn.example/steam/apps/{1000 + 10 * s + i}/library_600x900.jpg"
            members |= {f"{s}000{i}.jpg": jpeg(10 * s + i), f"{s}000{i}.json": json.dumps({"url": url}).encode(),
                        f"{s}000{i}.txt": b"caption"}
        return tar_bytes(members, inner_mode)

    shards = {f"images/0000{s}{suffix[inner_mode]}": shard(s) for s in (1, 2)}
    path = tmp_path / f"outer{suffix[outer_mode]}"
    path.write_bytes(tar_bytes({"images/00001_stats.json": b"{}", **shards}, outer_mode))
    before = set(tmp_path.rglob("*"))
    source = open_source(path)
    assert source.keys == ["1010", "1011", "1020", "1021"]
    assert all(len(e.via) == 1 for e in source.entries)
    plain = outer_mode == "w" and inner_mode == "w"
    assert all((e.offset >= 0) == plain for e in source.entries)  # seek-and-read only where nothing is compressed
    images = read_all(source)
    assert all(looks_like(images[k], int(k) - 1000) for k in source.keys)
    # a worker's share: only the wanted ones, each once
    assert sorted(i for i, _, _ in source.read({1, 2}.__contains__)) == [1, 2]
    assert set(tmp_path.rglob("*")) == before  # nothing extracted


def test_banners_are_placed_by_name_folder_metadata_or_app_list(tmp_path):
    d = tmp_path / "snap"
    (d / "apps" / "413150").mkdir(parents=True)
    (d / "apps" / "413150" / "library_600x900.jpg").write_bytes(jpeg(1))  # the CDN's layout
    (d / "227300.jpg").write_bytes(jpeg(2))
    (d / "cover.jpg").write_bytes(jpeg(3))  # nothing says which game
    (d / "parts").mkdir()
    (d / "parts" / "p.tar.gz").write_bytes(tar_bytes({"images/00000/000000001.jpg": jpeg(4),  # sample number 1
                                                      "images/00000/000000007.jpg": jpeg(5)}, "w:gz"))  # past the list
    (d / "apps.json").write_text(json.dumps([10, 570, 730]))  # the 2023 snapshot's app id list
    source = open_source(d)
    assert sorted(source.keys) == ["227300", "413150", "570"]
    images = read_all(source)
    assert looks_like(images["413150"], 1) and looks_like(images["227300"], 2) and looks_like(images["570"], 4)
    unplaced = {what for what, reason in source.report.skipped if reason.startswith("no app id")}
    assert unplaced == {str(d / "cover.jpg"), "p.tar.gz:images/00000/000000007.jpg"}


def test_only_unplaceable_names_are_one_clear_error(tmp_path):
    (tmp_path / "cover.jpg").write_bytes(jpeg(1))
    with pytest.raises(BannermatchError, match="no banner in .* has an app id.*227300.jpg"):
        open_source(tmp_path)


# ------------------------------------------------------------------------------------------ damaged archives

@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_read_never_raises_when_an_archive_is_cut_after_listing(tmp_path, mode):
    path = tmp_path / ("a.tar" if mode == "w" else "a.tar.gz")
    body = tar_bytes({f"{100 + i}.jpg": jpeg(i) for i in range(6)}, mode)
    path.write_bytes(body)
    source = open_source(path)
    assert len(source) == 6
    path.write_bytes(body[: len(body) // 2])
    got = list(source.read())
    assert sorted(i for i, _, _ in got) == list(range(6))  # every wanted index comes back, once
    bad = [data for _, _, data in got if isinstance(data, Unreadable)]
    assert 0 < len(bad) < 6
    with pytest.raises(SkipImage, match="a.tar.*(cut short|shorter).*`bannermatch download` resumes"):
        decode_image(bad[0])


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bannermatch.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _damaged(kind: str, d):
    full = tar_bytes({f"b/{100 + i}.jpg": jpeg(i) for i in range(6)})
    if kind == "tar cut inside a member":
        path = d / "banners.tar"
        path.write_bytes(full[: len(full) * 55 // 100 + 100])
    elif kind == "tar.gz cut at 55%":
        path = d / "banners.tar.gz"
        packed = gzip.compress(full)
        path.write_bytes(packed[: len(packed) * 55 // 100])
    elif kind == "random bytes named .tar":
        path = d / "banners.tar"
        path.write_bytes(os.urandom(20000))
    else:  # the folder of an interrupted download: the URL table, apps.json, one unfinished shard, no stats file
        path = d / "banners"
        path.mkdir()
        (path / "banner_urls.parquet").write_bytes(b"PAR1")
        (path / "apps.json").write_text("{}")
        (path / "00000.tar").write_bytes(full[: len(full) // 2])
    return path


@pytest.mark.parametrize("kind,code,embedded", [
    ("tar cut inside a member", 0, 3),
    ("tar.gz cut at 55%", 0, 3),
    ("random bytes named .tar", 2, 0),
    ("interrupted download folder", 2, 0),
])
def test_damaged_archives_through_the_cli_are_one_line(kind, code, embedded, tmp_path, tiny_weights):
    path = _damaged(kind, tmp_path)
    arch = ",".join(f"{k}={v}" for k, v in TINY_ARCH.items())
    proc = _cli("embed", path, "--model", "dino_vits16", "--arch", arch, "--weights", tiny_weights,
                "--store", tmp_path / "store", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(path) in proc.stderr and "bannermatch download" in proc.stderr and "again" in proc.stderr
    if embedded:
        assert proc.stdout.startswith(f"{embedded} banners embedded")
