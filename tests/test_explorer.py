"""Explorer: drive the widgets as a user would and check the grid shows the right games, under ipywidgets 8
(this venv) and 7.7.1 (Colab's)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

import bannermatch.explorer as explorer_module
from bannermatch import extract_features, list_feature_sets, make_recipe, query
from bannermatch.errors import BannermatchError
from bannermatch.explorer import explore
from conftest import APPS, TINY_ARCH

query_module = importlib.import_module("bannermatch.query")  # `bannermatch.query` is the function of that name

ROOT = Path(__file__).resolve().parents[1]
#: Colab's versions (/work/shared/colab/README.md, googlecolab/backend-info); --no-deps: the rest comes from this venv.
COLAB_WIDGETS = ["ipywidgets==7.7.1", "ipykernel==6.17.1", "ipython_genutils==0.2.0"]


@pytest.fixture(scope="module")
def store(banner_dir, tiny_weights, tmp_path_factory):
    """Two feature sets of the synthetic banners (same tiny model, two strategies: different neighbours)."""
    store = tmp_path_factory.mktemp("explorer_store")
    for strategy in ("simple", "complex"):
        recipe = make_recipe("dino_vits16", strategy, weights=tiny_weights, arch=TINY_ARCH)
        extract_features(banner_dir, recipe, store, weights=tiny_weights, device="cpu", progress=False)
    return store


def _shown(explorer) -> list[str]:
    """App ids in the rendered grid, in order (query first)."""
    return re.findall(r'<span class="bm-key">([^<]+)</span>', explorer.grid.value)


def _scores(explorer) -> list[str]:
    return re.findall(r'<span class="bm-score">([^<]+)</span>', explorer.grid.value)


def _expected(explorer, key: str) -> list[str]:
    result = query(explorer.features, key, k=explorer.k.value)[0]
    return [key, *(m for m, _ in result.matches)]


def test_typing_suggests_then_picking_renders_the_matches(store):
    ex = explore(store, k=5)
    assert ex.grid.value == "" and "type a game" in ex.status.value
    ex.query.value = "euro truck"  # ambiguous: two games
    assert set(ex.query.options) == {"Euro Truck Simulator 2 (227300)", "Euro Truck Simulator (232010)"}
    assert ex.grid.value == "" and "2 games match" in ex.status.value
    ex.query.value = "Euro Truck Simulator 2 (227300)"
    assert _shown(ex) == _expected(ex, "227300")
    assert len(_shown(ex)) == 6 and ex.grid.value.count("data:image/jpeg;base64,") == 6
    assert "<figcaption>Euro Truck Simulator 2<br>" in ex.grid.value


def test_app_id_exact_name_feature_set_and_k_update_the_grid(store):
    ex = explore(store, game="413150", k=4)  # Stardew Valley by app id
    labels = [label for label, _ in ex.feature_set.options]
    assert len(labels) == 2 and any("simple" in lab for lab in labels) and any("complex" in lab for lab in labels)
    first, first_scores, first_strategy = _shown(ex), _scores(ex), ex.features.recipe.strategy
    assert first == _expected(ex, "413150")
    ex.feature_set.value = 1 - ex.feature_set.value
    assert ex.features.recipe.strategy != first_strategy
    assert _shown(ex) == _expected(ex, "413150")
    expected_scores = [f"{s:.3f}" for _, s in query(ex.features, "413150", k=4)[0].matches]
    assert _scores(ex) == expected_scores != first_scores  # the other strategy's similarities are shown
    ex.k.value = 2
    assert _shown(ex) == _expected(ex, "413150")[:3]
    ex.query.value = "portal 2"  # an exact name (any case) needs no pick
    assert _shown(ex)[0] == "620" and ex.result.name == APPS["620"]


def test_unknown_games_and_empty_stores_are_reported_not_raised(store, tmp_path):
    ex = explore(store, game="220")
    before = ex.grid.value
    ex.query.value = "no such game anywhere"
    assert "no game" in ex.status.value and ex.query.options == () and ex.grid.value == before
    ex.query.value = "999999999"  # looks like an app id, is not in the set
    assert "no game" in ex.status.value
    with pytest.raises(BannermatchError, match="no feature sets"):
        explore(tmp_path)


def test_image_queries_load_the_model_once(store, banner_dir, tiny_weights, monkeypatch):
    image = str(banner_dir / "220.jpg")
    backbone = explorer_module.load_backbone(list_feature_sets(store)[0].recipe, tiny_weights)  # for the expected

    def expected(fs, k):
        return [key for key, _ in query(fs, image, k=k, backbone=backbone)[0].matches]

    loads = []
    real = explorer_module.load_backbone
    for module in (explorer_module, query_module):  # the explorer's own loads, and any query() would make
        monkeypatch.setattr(module, "load_backbone", lambda *args, **kwargs: loads.append(args) or real(*args, **kwargs))
    ex = explore(store, weights=tiny_weights, game=image, k=4)
    assert _shown(ex) == expected(ex.features, 4) and _shown(ex)[0] == "220" and _scores(ex)[0] == "1.000"  # itself
    assert ex.grid.value.count("data:image/jpeg;base64,") == 5  # the query image too
    ex.k.value = 2
    ex.k.value = 3
    ex.feature_set.value = 1 - ex.feature_set.value  # the other strategy: same model, same weights
    assert _shown(ex) == expected(ex.features, 3) and len(loads) == 1
    ex.query.value = "celeste"  # a stored game needs no model
    assert _shown(ex)[0] == "504230" and len(loads) == 1


@pytest.fixture(scope="module")
def archive_store(banner_dir, tiny_weights, tmp_path_factory):
    """A feature set of the banners read in place from a .tar.gz archive (the older release's format)."""
    folder = tmp_path_factory.mktemp("archive")
    with tarfile.open(folder / "banners.tar.gz", "w:gz") as tar:
        for appid in APPS:
            tar.add(banner_dir / f"{appid}.jpg", arcname=f"banners/{appid}.jpg")
    (folder / "apps.json").write_text(json.dumps(APPS))
    recipe = make_recipe("dino_vits16", "simple", weights=tiny_weights, arch=TINY_ARCH)
    extract_features(folder / "banners.tar.gz", recipe, folder / "store", weights=tiny_weights, device="cpu",
                     progress=False)
    return folder / "store"


def test_banners_on_show_are_read_from_the_archive_once(archive_store, monkeypatch):
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *args, **kwargs: opened.append(1) or real_open(*args, **kwargs))
    ex = explore(archive_store, game="220", k=3)
    assert opened and _shown(ex) == _expected(ex, "220") and ex.grid.value.count("data:image/jpeg;base64,") == 4
    opened.clear()
    ex.k.value = 2
    ex.k.value = 3
    assert _shown(ex) == _expected(ex, "220") and opened == []  # banners already shown: no archive opened
    ex.k.value = 6
    assert _shown(ex) == _expected(ex, "220") and ex.grid.value.count("data:image/jpeg;base64,") == 7
    assert len(opened) == 1  # the new banners, in one pass
    ex.query.value = "413150"
    opened.clear()
    ex.query.value = "220"
    assert _shown(ex) == _expected(ex, "220") and opened == []


@pytest.fixture(scope="session")
def colab_widgets_python(tmp_path_factory) -> str:
    """A Python with ipywidgets 7.7.1 and Colab's ipykernel over this venv's packages: a venv whose .pth file
    points at this venv's site-packages, with the old versions installed in front of them (once a session)."""
    venv = tmp_path_factory.mktemp("ipywidgets7") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    layered = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(layered, "bannermatch_tests_base.pth").write_text("".join(f"{p}\n" for p in ours))
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *COLAB_WIDGETS],
                         capture_output=True, text=True)
    if pip.returncode:
        pytest.fail(f"could not install {' '.join(COLAB_WIDGETS)} (the package registry is needed):\n{pip.stderr[-1500:]}")
    return str(python)


@pytest.mark.parametrize("widgets", ["8", "7.7.1"])
def test_explorer_renders_and_is_driven_under_ipywidgets_7_and_8(widgets, store, request):
    python = sys.executable if widgets == "8" else request.getfixturevalue("colab_widgets_python")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([python, str(ROOT / "tests" / "explorer_driver.py"), str(store)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["ipywidgets"].startswith(widgets)
    assert run["widgets"] == ["Dropdown", "Combobox", "IntSlider", "HTML", "HTML"]
    assert [view["model_id"] for view in run["views"]] == [run["model_id"]]  # displayed as one widget view

    feature_sets = list_feature_sets(store)
    start, typed, picked, more, other, portal = run["steps"]
    assert start["keys"] == [] and "type a game" in start["status"]
    assert typed["options"] == ["Euro Truck Simulator (232010)", "Euro Truck Simulator 2 (227300)"]
    assert typed["keys"] == [] and "2 games match" in typed["status"]
    for step, key in ((picked, "227300"), (more, "227300"), (other, "227300"), (portal, "620")):
        fs = feature_sets[step["feature_set"]]
        assert step["keys"] == [key, *(m for m, _ in query(fs, key, k=step["k"])[0].matches)], step["action"]
        assert step["images"] == step["k"] + 1 and fs.recipe.label in step["status"]
    assert (picked["k"], more["k"]) == (3, 5) and other["feature_set"] != more["feature_set"]
