"""The main-job command, `bannermatch run`, end to end (offline) and with no network."""

from __future__ import annotations

import subprocess
import sys
import time

from PIL import Image

from conftest import APPS, SHARED_APPS


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bannermatch.cli", "run", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_run_embeds_matches_and_draws_the_example_query(banner_dir, tiny_weights, tmp_path):
    out = tmp_path / "grid.png"
    proc = _run("--images", banner_dir, "--weights", tiny_weights, "--model", "dino_vits16",
                "--arch", "embed_dim=48,depth=4,num_heads=3", "--store", tmp_path / "store", "--out", out,
                "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "top-10 matches of 20 banners" in lines[0]
    assert lines[1] == "Euro Truck Simulator 2 (227300):"
    listed = [line.split()[1] for line in lines[2:12]]
    assert len(set(listed)) == 10 and set(listed) <= set(APPS) - {"227300"}
    assert Image.open(out).size[0] > 500
    assert list((tmp_path / "store").glob("*/matches/simple.*.npz"))


def test_run_without_network_stops_at_once_with_the_offline_options(tmp_path):
    """The options it names are run's own, as the README promises (#22 item 4), and it leaves no list of banners
    behind for the next, online run to finish (item 5: that run asked the CDN for all 29,982 shipped banners)."""
    started = time.monotonic()
    proc = _run("--images", tmp_path / "banners", "--app-list", SHARED_APPS, "--host", "http://127.0.0.1:9",
                "--quiet", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    fallback, error = proc.stderr.strip().splitlines()  # the snapshot's host first, then the CDN's: a line each
    assert "dinov2-2023 snapshot is unavailable" in fallback and fallback.endswith("from the Steam CDN instead")
    assert "cannot reach http://127.0.0.1:9" in error and "--images PATH" in error and "--weights PATH" in error
    assert "--archive" not in error and "--app-list" not in error  # options of `download`, not of `run`
    assert time.monotonic() - started < 60
    assert not list((tmp_path / "banners").rglob("banner_urls.parquet"))


def test_published_weights_unreachable_is_one_line(monkeypatch):
    import socket

    import pytest

    from bannermatch import BannermatchError
    from bannermatch.backbones import create_model

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(BannermatchError, match="cannot reach huggingface.co.*--weights PATH"):
        create_model("dino_vitb16")


def test_embed_compiles_where_it_pays_unless_told(monkeypatch, tmp_path):
    """No flag: compile=None, the library weighs the break-even; --compile / --no-compile force it."""
    import numpy as np

    from bannermatch import cli, extraction

    seen = []

    class Features:
        keys, skipped, path = [], [], tmp_path
        features = np.zeros((0, 48))

    monkeypatch.setattr(extraction, "extract_features", lambda *a, **kw: seen.append(kw["compile"]) or Features())
    for flags in ([], ["--compile"], ["--no-compile"]):
        assert cli.main(["embed", str(tmp_path), "--store", str(tmp_path / "store"), *flags]) == 0
    assert seen == [None, True, False]
