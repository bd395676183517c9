"""Hardening: hostile images and archives, damaged stored results, kill -9 at random points, CLI errors."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bannermatch import BannermatchError, extract_features, find_matches, load_features, make_recipe
from bannermatch import sources
from bannermatch.sources import SkipImage, decode_image, decode_pixels, open_source, pil_to_tensor

from conftest import APPS, TINY_ARCH, draw_banner


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ images

def test_decoding_every_kind_of_image():
    banner = draw_banner(7)
    rgba = banner.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited over white
    assert np.asarray(decode_image(_png(rgba))).min() == 255

    palette = banner.convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.abs(np.asarray(decode_image(_png(palette)), float) - np.asarray(palette.convert("RGB"), float)).max() == 0

    sixteen = Image.fromarray(np.full((45, 30), 65535, np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert np.asarray(decode_image(_png(sixteen))).min() == 255  # scaled, not clipped to garbage

    cmyk = decode_image(_jpeg(banner.convert("CMYK")))
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, float) - np.asarray(banner, float)).mean() < 20

    gray = decode_image(_jpeg(banner.convert("L")))
    assert gray.mode == "RGB" and gray.size == banner.size

    assert decode_image(_png(Image.new("RGB", (1, 1), (9, 9, 9)))).size == (1, 1)

    # EXIF orientation 6: stored landscape, shown portrait
    landscape = banner.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode_image(_jpeg(landscape, exif=exif.tobytes(), quality=95))
    assert upright.size == (300, 450)
    assert np.abs(np.asarray(upright, float) - np.asarray(banner, float)).mean() < 8

    for fmt in ("GIF", "WEBP"):  # animated: the first frame
        buf = io.BytesIO()
        frames = [draw_banner(1), draw_banner(2)]
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        first = decode_image(buf.getvalue())
        assert first.mode == "RGB" and first.size == (300, 450)
        assert np.abs(np.asarray(first, float) - np.asarray(draw_banner(1), float)).mean() < 25


def test_size_hint_decodes_large_jpegs_smaller_never_below_the_hint():
    large = draw_banner(3, size=(600, 900))
    assert decode_image(_jpeg(large), min_size=(256, 256)).size == (300, 450)  # 1/2 scale in the DCT domain
    assert decode_image(_jpeg(large), min_size=(451, 300)).size == (600, 900)  # 1/2 would be below the hint
    assert decode_image(_jpeg(large), min_size=(200, 120)).size == (150, 225)  # 1/4
    assert decode_image(_jpeg(large)).size == (600, 900)  # no hint: full size
    assert decode_image(_png(large), min_size=(200, 120)).size == (600, 900)  # only JPEGs have a draft mode
    # the hint is for the upright image: a landscape JPEG shown portrait (EXIF 6) keeps its upright width
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _jpeg(large.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    assert decode_image(rotated, min_size=(200, 400)).size == (600, 900)
    assert decode_image(rotated, min_size=(400, 200)).size == (300, 450)


def test_decode_pixels_equals_decode_image_and_takes_the_fast_path_only_for_plain_jpegs(monkeypatch):
    """Extraction decodes plain RGB JPEGs with torchvision's decoder: every kind of image must give the pixels of
    decode_image, and only plain full-size JPEGs may take that path."""
    from real_photos import photos

    real = sources._jpeg_decoder()
    assert real is not None  # torchvision's image extension loads here: the fast path is what is tested
    fast_calls = []
    def counted(data):  # counts the pixels the fast decoder returned, not its tries
        pixels = real(data)
        fast_calls.append(1)
        return pixels

    monkeypatch.setattr(sources, "_jpeg_decoder", lambda: counted)
    photo, banner = photos(longest=450)[2], draw_banner(7)
    rgba = banner.convert("RGBA")
    rgba.putalpha(90)
    exif = Image.Exif()
    exif[0x0112] = 6
    plain = {"photo q90": _jpeg(photo, quality=90), "banner q75": _jpeg(banner, quality=75),
             "4:4:4": _jpeg(photo, quality=95, subsampling=0), "progressive": _jpeg(photo, progressive=True),
             "large, hint too big to draft": _jpeg(draw_banner(3, size=(600, 900)))}
    other = {"png rgba": _png(rgba), "png palette": _png(banner.convert("P", palette=Image.Palette.ADAPTIVE)),
             "cmyk jpeg": _jpeg(banner.convert("CMYK")), "gray jpeg": _jpeg(banner.convert("L")),
             "rotated jpeg": _jpeg(banner.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()),
             "large, drafted": _jpeg(draw_banner(3, size=(900, 1350)))}
    for name, data in {**plain, **other}.items():
        before = len(fast_calls)
        hint = {"large, hint too big to draft": (451, 300), "large, drafted": (256, 256)}.get(name)
        pixels, expected = decode_pixels(data, hint), pil_to_tensor(decode_image(data, hint))
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, expected), name
        assert len(fast_calls) - before == (name in plain), name
    for data, reason in [(b"", "empty file"), (_jpeg(photo)[:900], "corrupt image"), (_jpeg(photo)[:-2], "corrupt image")]:
        with pytest.raises(SkipImage, match=reason):  # the fast decoder refuses, PIL says why
            decode_pixels(data)


def test_decoding_on_threads_leaves_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """Banners are decoded on several threads; warnings' filters belong to the process, and saving and restoring
    them on threads that interleave once left an "error" filter behind (every later warning an exception, and a
    harmless EXIF warning ended the run). Pillow warns for the bad EXIF tag of every 4th banner here."""
    import struct

    from bannermatch.extraction import _Decoded

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # the decoding threads: one a core
    bad_tag = (b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
               + struct.pack("<HHII", 0x010E, 2, 100, 1000) + struct.pack("<I", 0))
    for i, app in enumerate(APPS):
        draw_banner(i).save(tmp_path / f"{app}.jpg", quality=95, **({"exif": bad_tag} if i % 4 == 3 else {}))
    source, recipe = open_source(tmp_path), make_recipe("dino_vits16", arch=TINY_ARCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the user's own setting, kept while banners are decoded
        before = list(warnings.filters)
        for _ in range(8):
            decoded = list(_Decoded(source, list(range(len(source))), set(), recipe))
            assert [reason for *_, reason, _ in decoded] == [""] * len(APPS)
            assert warnings.filters == before


def test_the_decoding_processes_are_counted_from_one_thread_s_decoding_time():
    """Decoding here runs on every core, so its wall time is a fraction of what a decoding process (one thread)
    takes: the count of processes must come from the time summed over the threads."""
    from bannermatch.extraction import _Pace

    pace = _Pace()
    for _ in range(_Pace.WARMUP + _Pace.MEASURED):
        pace.modelled(10, 0.1)  # 10 ms an image
    pace.decoded(10, 0.1, 0.3)  # 10 ms an image here on 3 threads, 30 ms on one
    assert pace.ready and pace.workers(cpus=8) == 3
    pace = _Pace()
    for _ in range(_Pace.WARMUP + _Pace.MEASURED):
        pace.modelled(10, 1.0)
    pace.decoded(10, 0.05, 0.15)  # cheap beside a 100 ms model: decoded inline
    assert pace.workers(cpus=8) == 0


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (os.urandom(2048), "not an image"),
    (_jpeg(draw_banner(3))[:700], "corrupt image"),
])
def test_unusable_bytes_give_a_reason(data, reason):
    with pytest.raises(SkipImage, match=reason):
        decode_image(data)


def test_decompression_bomb_is_skipped():
    bomb = _png(Image.fromarray(np.zeros((9500, 9500), np.uint8)))  # 90 M pixels > Pillow's limit
    with pytest.raises(SkipImage, match="too large"):
        decode_image(bomb)


def test_a_run_over_hostile_images_completes_and_reports_every_skip(tmp_path, tiny_weights):
    d = tmp_path / "imgs"
    d.mkdir()
    good = {
        "1": _jpeg(draw_banner(1)), "2": _png(draw_banner(2).convert("RGBA")), "3": _png(draw_banner(3).convert("P")),
        "4": _jpeg(draw_banner(4).convert("CMYK")), "5": _jpeg(draw_banner(5).convert("L")),
        "6": _png(Image.new("RGB", (1, 1))), "7": _png(Image.fromarray(np.full((450, 300), 40000, np.uint16))),
    }
    bad = {"90": b"", "91": _jpeg(draw_banner(9))[:600], "92": os.urandom(999)}
    for key, data in {**good, **bad}.items():
        suffix = "png" if data.startswith(b"\x89PNG") else "jpg"
        (d / f"{key}.{suffix}").write_bytes(data)
    (d / "93.jpg").symlink_to(tmp_path / "outside.jpg")
    (tmp_path / "outside.jpg").write_bytes(_jpeg(draw_banner(10)))
    recipe = make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)
    fs = extract_features(d, recipe, tmp_path / "store", tiny_weights, workers=0, progress=False)
    assert sorted(fs.keys) == sorted(good)
    reasons = {k: r for k, r in fs.skipped}
    assert set(reasons) == {"90", "91", "92", "93.jpg"}
    assert reasons["93.jpg"] == "symbolic link"
    assert np.all(np.isfinite(fs.features))


# ------------------------------------------------------------------------------------------ archives

def _tar_with_tricks(path, outside):
    with tarfile.open(path, "w") as tar:
        def add(name, data=None, **attrs):
            info = tarfile.TarInfo(name)
            for k, v in attrs.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add("data/banners/100.jpg", _jpeg(draw_banner(100)))
        add("../200.jpg", _jpeg(draw_banner(200)))
        add("/abs/300.jpg", _jpeg(draw_banner(300)))
        add("data/banners/400.jpg", type=tarfile.SYMTYPE, linkname=str(outside))
        add("data/banners/500.jpg", type=tarfile.LNKTYPE, linkname="data/banners/100.jpg")
        add("data/other/100.jpg", _jpeg(draw_banner(101)))  # duplicate key: the first one wins
        add("data/banners/600.jpg", _jpeg(draw_banner(600)))


def test_tar_members_never_escape_and_duplicates_are_reported(tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(_jpeg(draw_banner(999)))
    archive = tmp_path / "a.tar.gz"
    _tar_with_tricks(archive.with_suffix(""), outside)
    with open(archive.with_suffix(""), "rb") as src, __import__("gzip").open(archive, "wb") as dst:
        dst.write(src.read())
    for path in (archive.with_suffix(""), archive):
        before = set(tmp_path.rglob("*"))
        source = open_source(path)
        assert source.keys == ["100", "600"]
        reasons = dict(source.report.skipped)
        assert reasons == {"../200.jpg": "unsafe path in archive", "/abs/300.jpg": "unsafe path in archive",
                           "data/banners/400.jpg": "link in archive", "data/banners/500.jpg": "link in archive"}
        assert source.report.duplicates == [("100", f"{path.name}:data/other/100.jpg")]
        images = {key: img for key, img in source}
        assert np.abs(np.asarray(images["100"], float) - np.asarray(draw_banner(100), float)).mean() < 8
        assert set(tmp_path.rglob("*")) == before  # read in place: nothing written anywhere


def test_zip_members_never_escape(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/1.jpg", _jpeg(draw_banner(1)))
        zf.writestr("../2.jpg", _jpeg(draw_banner(2)))
        zf.writestr("/3.jpg", _jpeg(draw_banner(3)))
        link = zipfile.ZipInfo("data/4.jpg")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.writestr("other/1.jpg", _jpeg(draw_banner(5)))
    source = open_source(path)
    assert source.keys == ["1"]
    assert {r for _, r in source.report.skipped} == {"unsafe path in archive", "link in archive"}
    assert len(source.report.skipped) == 3 and [k for k, _ in source.report.duplicates] == ["1"]


def test_unfinished_download_shards_are_not_read(tmp_path):
    for shard in ("00000", "00001"):
        with tarfile.open(tmp_path / f"{shard}.tar", "w") as tar:
            for i in range(2):
                key, appid = f"{shard}{i:04d}", str(int(shard) * 10 + i + 1)
                for suffix, data in ((".jpg", _jpeg(draw_banner(int(appid)))), (".json", json.dumps({"appid": appid}).encode())):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (tmp_path / "00000_stats.json").write_text("{}")  # shard 00001 was being written when the download died
    source = open_source(tmp_path)
    assert source.keys == ["1", "2"]
    assert source.report.skipped == [(str(tmp_path), f"{tmp_path}: 1 unfinished shard (00001.tar): the download was "
                                      f"interrupted; run `bannermatch download {tmp_path}` again to resume")]


# ------------------------------------------------------------------------------------------ stored results

@pytest.fixture
def stored(banner_dir, tiny_weights, tmp_path):
    recipe = make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)
    return extract_features(banner_dir, recipe, tmp_path / "store", tiny_weights, workers=0, chunk_size=8, progress=False)


def _segment(stored, i: int):
    """The i-th segment the manifest lists (segments are named by their own sha256)."""
    return stored.path / json.loads((stored.path / "manifest.json").read_text())["segments"][i]["file"]


def _resave(path, **changes):
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays.update(changes)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def test_truncated_or_edited_files_get_a_clear_error(stored):
    manifest = stored.path / "manifest.json"
    segment = _segment(stored, 1)
    original = segment.read_bytes()
    segment.write_bytes(original[: len(original) // 2])
    with pytest.raises(BannermatchError, match=f"{segment.name} was changed or damaged.*embed again"):
        load_features(stored.path)
    with np.load(io.BytesIO(original)) as data:
        cls = data["cls"].copy()
    cls[0, 0, 0] += 1  # a valid file with one edited number
    segment.write_bytes(original)
    _resave(segment, cls=cls)
    with pytest.raises(BannermatchError, match=f"{segment.name} was changed"):
        load_features(stored.path)
    segment.write_bytes(original)
    assert load_features(stored.path).keys == stored.keys

    text = manifest.read_text()
    manifest.write_text(text[:100])
    with pytest.raises(BannermatchError, match="manifest.json is damaged"):
        load_features(stored.path)
    m = json.loads(text)
    m["library"] = "0.0.1"
    manifest.write_text(json.dumps(m))
    with pytest.raises(BannermatchError, match="written by bannermatch 0.0.1.*embed again"):
        load_features(stored.path)


def test_damaged_segment_is_recomputed_on_rerun(stored, banner_dir, tiny_weights, caplog):
    segment = _segment(stored, 0)
    segment.write_bytes(b"garbage")
    again = extract_features(banner_dir, stored.recipe, stored.path.parent, tiny_weights, workers=0, chunk_size=8, progress=False)
    assert f"{segment.name} was changed or damaged since it was written; its banners are embedded again" in caplog.text
    np.testing.assert_allclose(again.features, stored.features, atol=1e-6)


def test_edited_matches_are_recomputed(stored):
    m = find_matches(stored, k=3)
    bad = m.neighbours.copy()
    bad[:, 0] = 0
    _resave(m.path, neighbours=bad)
    again = find_matches(stored, k=3)
    np.testing.assert_array_equal(again.neighbours, m.neighbours)


def test_pickled_arrays_are_refused(stored):
    from bannermatch.files import file_digest

    segment = _segment(stored, 0)
    buf = io.BytesIO()
    np.savez(buf, key=np.array([{"a": 1}], dtype=object))  # a pickle inside, with a matching digest in the manifest
    segment.write_bytes(buf.getvalue())
    manifest = json.loads((stored.path / "manifest.json").read_text())
    manifest["segments"][0]["sha256"] = file_digest(segment)
    (stored.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BannermatchError, match=f"{segment.name} is damaged"):
        load_features(stored.path)


# ------------------------------------------------------------------------------------------ kill -9

def _cli(*args, cwd=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "bannermatch.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def many_banners(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    for i in range(96):  # twelve chunks of 8
        draw_banner(1000 + i).save(d / f"{5000 + i}.jpg", quality=90)
    return d


def test_kill_during_embed_and_match_then_resume_gives_identical_results(many_banners, tiny_weights, tmp_path):
    common = ["--model", "dino_vits16", "--weights", tiny_weights, "--arch", "embed_dim=48,depth=4,num_heads=3",
              "--device", "cpu"]
    embed = ["--dtype", "float32", "--chunk-size", "8", "--batch-size", "8", "--workers", "0", "--quiet"]
    match = ["-k", "5", "--precision", "float32"]
    ref = _cli("embed", many_banners, *common, *embed, "--store", tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    assert _cli("match", *common, *match, "--store", tmp_path / "ref").wait(timeout=120) == 0
    reference = load_features(next((tmp_path / "ref").iterdir()))
    ref_nb = find_matches(reference, 5, precision="float32").neighbours

    def chunks_done(store):
        try:
            return len(json.loads(next(store.iterdir()).joinpath("manifest.json").read_text())["segments"])
        except (StopIteration, OSError, ValueError):
            return 0

    for seed in range(3):
        rng = random.Random(seed)
        store = tmp_path / f"run{seed}"
        for _ in range(2):  # killed twice at random moments while chunks are being written, then left to finish
            target = min(chunks_done(store) + rng.randint(1, 3), 8)  # at least 4 of 12 chunks left to kill
            proc = _cli("embed", many_banners, *common, *embed, "--store", store, start_new_session=True)
            while proc.poll() is None and chunks_done(store) < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.05))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            folder = next(store.iterdir())
            manifest = json.loads((folder / "manifest.json").read_text())  # always whole, never half-written
            for info in manifest["segments"]:  # every listed segment is complete
                with np.load(folder / info["file"]) as data:
                    assert data["cls"].shape[0] == len(data["key"]) == info["rows"]
            assert len(manifest["segments"]) < 12  # it really was interrupted
        assert _cli("embed", many_banners, *common, *embed, "--store", store).wait(timeout=300) == 0
        resumed = load_features(next(store.iterdir()))
        assert resumed.keys == reference.keys
        np.testing.assert_array_equal(resumed.features, reference.features)

        proc = _cli("match", *common, *match, "--store", store, start_new_session=True)
        time.sleep(rng.uniform(0.5, 3.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert _cli("match", *common, *match, "--store", store).wait(timeout=120) == 0
        with np.load(find_matches(resumed, 5, precision="float32").path) as saved:
            np.testing.assert_array_equal(saved["neighbours"], ref_nb)


# ------------------------------------------------------------------------------------------ CLI errors

@pytest.mark.parametrize("args,message", [
    (["embed", "{banners}", "--model", "dino_vitz16"], "invalid choice: 'dino_vitz16'"),
    (["embed", "{banners}", "--strategy", "fancy"], "invalid choice: 'fancy' (choose from"),
    (["embed", "{tmp}/missing"], "no such file or folder"),
    (["embed", "{tmp}/empty"], "no images found"),
    (["show", "227300", "--store", "{tmp}/nostore"], "run `bannermatch embed` first"),
    (["match", "-k", "0"], "must be at least 1"),
])
def test_cli_errors_are_one_line_with_exit_code_2(args, message, banner_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a.format(banners=banner_dir, tmp=tmp_path) for a in args]
    proc = _cli(*args, cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_cli_k_larger_than_collection(banner_dir, tiny_weights, tmp_path):
    common = ["--weights", tiny_weights, "--arch", "embed_dim=48,depth=4,num_heads=3", "--model", "dino_vits16",
              "--store", tmp_path, "--device", "cpu"]
    assert _cli("embed", banner_dir, *common, "--workers", "0", "--quiet").wait(timeout=300) == 0
    proc = _cli("match", *common, "-k", "50")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip() == "bannermatch: error: k=50 is larger than the 19 other banners there are to match"
    proc = _cli("show", "Euro Truck Simulator 2", *common, "-k", "3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.splitlines()[0] == f"{APPS['227300']} (227300):" and len(out.splitlines()) == 4
