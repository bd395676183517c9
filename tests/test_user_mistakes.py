"""Every user mistake of #22, tried as a new user would: one line on stderr, exit code 2, no traceback, and
nothing hangs. Each used to end in a traceback, a hang, a silent wrong setting or a misleading message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from conftest import TINY_ARCH

from bannermatch.cli import main

ARCH = ",".join(f"{k}={v}" for k, v in TINY_ARCH.items())


def recipe(weights) -> list[str]:
    return ["--model", "dino_vits16", "--arch", ARCH, "--weights", str(weights), "--device", "cpu"]


@pytest.fixture(scope="module")
def store(banner_dir, tiny_weights, tmp_path_factory):
    """The 20 synthetic banners embedded with the tiny model's local weights."""
    store = tmp_path_factory.mktemp("store")
    assert main(["embed", str(banner_dir), *recipe(tiny_weights), "--store", str(store), "--quiet"]) == 0
    return store


def one_line_error(capsys, argv) -> str:
    """Run the command line in this process: any exception fails the test, as its traceback would show."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("bannermatch") and "Traceback" not in err, err
    return err


def test_store_naming_a_file(tmp_path, banner_dir, tiny_weights, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    err = one_line_error(capsys, ["embed", banner_dir, *recipe(tiny_weights), "--store", tmp_path / "notes.txt"])
    assert "notes.txt is a file, not a folder" in err
    err = one_line_error(capsys, ["embed", banner_dir, *recipe(tiny_weights), "--store", tmp_path / "notes.txt" / "x"])
    assert "notes.txt is a file, not a folder" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_negative_workers(banner_dir, tiny_weights, tmp_path, capsys):
    err = one_line_error(capsys, ["embed", banner_dir, *recipe(tiny_weights), "--store", tmp_path, "--workers", "-1"])
    assert "--workers: must be at least 0" in err


def test_show_into_a_missing_folder_fails_before_printing_anything(store, tiny_weights, tmp_path, capsys):
    err = one_line_error(capsys, ["show", "227300", *recipe(tiny_weights), "--store", store,
                                  "--out", tmp_path / "no" / "such" / "g.png"])
    assert f"no folder {tmp_path / 'no' / 'such'} to write g.png into" in err


def test_gallery_out_naming_a_file(store, tiny_weights, tmp_path, capsys):
    (tmp_path / "page.html").write_text("mine")
    err = one_line_error(capsys, ["gallery", *recipe(tiny_weights), "--store", store, "--out", tmp_path / "page.html"])
    assert "page.html is a file, not a folder" in err


def test_arch_size_that_is_no_number(banner_dir, tiny_weights, tmp_path, capsys):
    err = one_line_error(capsys, ["embed", banner_dir, "--model", "dino_vits16", "--arch", "depth=x",
                                  "--weights", tiny_weights, "--store", tmp_path, "--device", "cpu"])
    assert "depth=x: an architecture size is a number" in err


def test_manifest_missing_a_part(store, banner_dir, tiny_weights, tmp_path, capsys):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    manifest = next(copy.glob("*/manifest.json"))
    data = json.loads(manifest.read_text())
    del data["identities"]
    manifest.write_text(json.dumps(data))
    err = one_line_error(capsys, ["embed", banner_dir, *recipe(tiny_weights), "--store", copy, "--quiet"])
    assert f"{manifest} is not a bannermatch manifest of this format" in err


def test_n_last_blocks_zero_is_refused_not_turned_into_four(store, tiny_weights, capsys):
    err = one_line_error(capsys, ["match", *recipe(tiny_weights), "--store", store, "--strategy", "complex",
                                  "--n-last-blocks", "0"])
    assert "n_last_blocks must be between 1 and 4" in err


def test_a_folder_without_a_usable_image_is_an_error_not_an_empty_feature_set(tiny_weights, tmp_path, capsys):
    """It used to exit 0 with "0 banners embedded (0-d)", and `match -k 1` then spoke of "-1 other banners"."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "10.jpg").write_text("not a jpeg")
    (images / "70.png").write_bytes(b"")
    err = one_line_error(capsys, ["embed", images, *recipe(tiny_weights), "--store", tmp_path / "store", "--quiet"])
    assert f"none of the 2 images in {images} could be used" in err


def test_show_without_the_weights_it_was_embedded_with_says_which(store, capsys):
    err = one_line_error(capsys, ["show", "227300", "--model", "dino_vits16", "--arch", ARCH, "--store", store])
    assert "they were embedded with local weights (sha256:" in err and "pass the same --weights" in err


def test_run_writes_its_default_grid_where_no_folder_was_yet(banner_dir, tiny_weights, tmp_path, monkeypatch, capsys):
    """`run --images imgs --store st` did the whole job, then failed on its default grid path's missing folder."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--images", str(banner_dir), *recipe(tiny_weights), "--store", str(tmp_path / "st"),
                 "-k", "3", "--quiet"]) == 0
    assert "grid saved to bannermatch_data/matches.png" in capsys.readouterr().out
    assert (tmp_path / "bannermatch_data" / "matches.png").stat().st_size > 0


def test_run_reads_an_archive_given_as_its_images(banner_dir, tiny_weights, tmp_path, capsys):
    """It used to look for a snapshot folder inside the archive: NotADirectoryError 'corpus.tar/dinov2-2023'."""
    corpus = tmp_path / "corpus.tar"
    with tarfile.open(corpus, "w") as tar:
        for path in sorted(banner_dir.iterdir()):
            tar.add(path, arcname=f"banners/{path.name}")
    assert main(["run", "--images", str(corpus), *recipe(tiny_weights), "--store", str(tmp_path / "st"), "-k", "3",
                 "--out", str(tmp_path / "grid.png"), "--quiet"]) == 0
    assert "top-3 matches of 20 banners" in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_among_the_banners_is_skipped_not_read_forever(banner_dir, tiny_weights, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(banner_dir, images)
    os.mkfifo(images / "40.jpg")  # named like a banner: it used to be opened, and the read never returned
    os.mkfifo(images / "x.jpg")
    proc = subprocess.run([sys.executable, "-m", "bannermatch.cli", "embed", str(images), *recipe(tiny_weights),
                           "--store", str(tmp_path / "store"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("20 banners embedded")
    assert "skipped 2 items: not a regular file (e.g. 40.jpg, x.jpg)" in proc.stderr
    manifest = json.loads(next((tmp_path / "store").glob("*/manifest.json")).read_text())
    assert ["40.jpg", "not a regular file"] in manifest["collection"]["skipped"]
