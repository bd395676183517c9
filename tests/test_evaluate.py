"""Evaluation: metric correctness on constructed cases, copy transforms, franchise stems on real Steam names,
and one end-to-end comparison of two tiny recipes that must reuse every cached result the second time."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from bannermatch import evaluate, extraction
from bannermatch.store import MANIFEST
from bannermatch.cli import main
from bannermatch.errors import BannermatchError
from bannermatch.evaluate import (TRANSFORMS, compare, copy_detection, franchise_groups, franchise_precision,
                                  franchise_stem, overlap_at_k, recipe_grid, transformed_copy)
from bannermatch.recipe import make_recipe

from conftest import APPS, TINY_ARCH, draw_banner


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ copy detection

def test_identical_copies_are_found_first():
    db = _unit_rows(50, 16, 0)
    true = np.arange(50)
    names = ["a", "b"] * 25
    result = copy_detection(db, db, true, names, k=10)
    for group in ("all", "a", "b"):
        assert result[group]["recall@1"] == 1.0
        assert result[group]["recall@10"] == 1.0
        assert result[group]["mAP@50"] == 1.0  # cutoff capped at the database size
    assert result["a"]["copies"] == result["b"]["copies"] == 25


def test_random_copies_score_about_chance():
    n, n_queries, k = 2000, 1000, 10
    db, copies = _unit_rows(n, 32, 1), _unit_rows(n_queries, 32, 2)
    true = np.random.default_rng(3).integers(0, n, n_queries)
    result = copy_detection(copies, db, true, k=k)["all"]
    sigma = math.sqrt(k / n * (1 - k / n) / n_queries)
    assert abs(result["recall@10"] - k / n) < 4 * sigma
    assert result["recall@1"] <= 5 / n_queries
    harmonic_100 = sum(1 / r for r in range(1, 101))
    assert result["mAP@100"] < 3 * harmonic_100 / n  # expected: H(100)/n


def test_hand_computed_map():
    db = np.eye(4, dtype=np.float32)
    # copy 0 ranks its original 1st; copy 1 ranks it 2nd; copy 2 3rd; copy 3 4th (beyond a cutoff of 2 -> AP 0)
    copies = np.array([[1, 0, 0, 0], [0.9, 0.5, 0, 0], [0.9, 0.8, 0.5, 0], [0.9, 0.8, 0.7, 0.1]], np.float32)
    result = copy_detection(copies, db, np.arange(4), k=2, cutoff=2)["all"]
    assert result["recall@1"] == pytest.approx(0.25)
    assert result["recall@2"] == pytest.approx(0.5)
    assert result["mAP@2"] == pytest.approx((1 + 1 / 2 + 0 + 0) / 4)
    result = copy_detection(copies, db, np.arange(4), k=2, cutoff=4)["all"]
    assert result["mAP@4"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_copy_detection_checks_lengths():
    with pytest.raises(BannermatchError):
        copy_detection(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), np.arange(2))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transforms_keep_a_valid_image_that_differs(name):
    original = draw_banner(7)
    copy = transformed_copy(original, name, seed=0, key="227300")
    assert copy.mode == "RGB"
    assert 100 <= copy.width <= 2 * original.height and copy.height == original.height
    assert copy.size != original.size or np.abs(np.asarray(copy, np.int16) - np.asarray(original, np.int16)).mean() > 1
    again = transformed_copy(original, name, seed=0, key="227300")
    assert np.array_equal(np.asarray(copy), np.asarray(again))  # deterministic for a seed


def test_random_transforms_depend_on_seed_and_key():
    original = draw_banner(8)
    crops = {(seed, key): np.asarray(transformed_copy(original, "crop", seed, key)).tobytes()
             for seed in (0, 1) for key in ("10", "20")}
    assert len(set(crops.values())) == 4


def test_unknown_transform_is_a_clear_error(banner_dir, tiny_weights, tmp_path):
    with pytest.raises(BannermatchError, match="unknown transform sepia"):
        transformed_copy(draw_banner(0), "sepia", seed=0, key="10")
    recipe = make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)
    with pytest.raises(BannermatchError, match="unknown transform"):
        compare(banner_dir, [recipe], tmp_path, tiny_weights, "cpu", transforms=["sepia"], progress=False)


# ------------------------------------------------------------------------------------------ franchises

@pytest.mark.parametrize("name, stem", [
    ("Euro Truck Simulator 2", "euro truck simulator"),
    ("Call of Duty® 4: Modern Warfare®", "call of duty"),
    ("Warhammer 40,000: Dawn of War II", "warhammer 40000"),
    ("DARK SOULS™ III", "dark souls"),
    ("FINAL FANTASY VIII - REMASTERED", "final fantasy"),
    ("Sid Meier’s Civilization® VI", "sid meier s civilization"),
    ("The Witcher: Enhanced Edition Director's Cut", "witcher"),
    ("Fallout 3 Game of the Year Edition", "fallout"),
    ("Half-Life 2", "half life"),
    ("Left 4 Dead 2", "left 4 dead"),
    ("Seek Girl Ⅲ", "seek girl"),
    ("Terraria", "terraria"),
    ("2048", ""),
])
def test_franchise_stem(name, stem):
    assert franchise_stem(name) == stem


def test_franchise_groups_on_steam_names(steam_names):
    groups = franchise_groups(steam_names)
    group_of = {key: stem for stem, keys in groups.items() for key in keys}
    assert group_of["227300"] == group_of["232010"]  # Euro Truck Simulator 2 and 1
    for a, b in [("70", "220"), ("400", "620"), ("10", "730"), ("8930", "289070"), ("292030", "20900"),
                 ("2620", "7940"), ("15620", "55150"), ("211420", "374320")]:
        assert group_of[a] == group_of[b], (steam_names[a], steam_names[b])
    # one-word titles stay apart, and "Portal" does not swallow "Portal Knights"
    for key in ("105600", "504230", "413150"):  # Terraria, Celeste, Stardew Valley
        assert key not in group_of
    assert "374040" not in groups[group_of["400"]]
    assert group_of["8930"] != group_of["202200"]  # Civilization vs Galactic Civilizations
    assert all(len(keys) >= 2 for keys in groups.values())


def test_franchise_precision_and_chance():
    keys = ["a1", "a2", "a3", "b1", "b2", "c"]
    groups = {"a": ["a1", "a2", "a3"], "b": ["b1", "b2"], "gone": ["x", "c"]}  # "x" is not in the collection
    # neighbours (indices into keys, self excluded), k=2
    neighbours = np.array([[1, 3], [0, 2], [5, 4], [4, 0], [0, 1], [0, 1]])
    result = franchise_precision(neighbours, keys, groups, k=2)
    # a1: 1/2, a2: 2/2, a3: 0/2, b1: 1/2, b2: 0/2; "c" has no other member here, so it is no query
    assert result["queries"] == 5
    assert result["precision@2"] == pytest.approx((0.5 + 1 + 0 + 0.5 + 0) / 5)
    assert result["chance@2"] == pytest.approx((3 * 2 / 5 + 2 * 1 / 5) / 5)
    assert franchise_precision(neighbours, keys, {}, k=2)["queries"] == 0


def test_random_neighbours_score_franchise_chance():
    rng = np.random.default_rng(0)
    n, k = 3000, 10
    keys = [str(i) for i in range(n)]
    groups = {f"g{g}": [str(i) for i in range(g * 10, g * 10 + 10)] for g in range(100)}  # 1000 keys in groups of 10
    neighbours = np.array([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    result = franchise_precision(neighbours, keys, groups, k=k)
    assert result["queries"] == 1000
    assert result["chance@10"] == pytest.approx(9 / (n - 1))
    assert abs(result["precision@10"] - result["chance@10"]) < 0.003


def test_overlap_at_k():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    assert overlap_at_k(a, a) == 1.0
    assert overlap_at_k(a, np.array([[3, 9, 1], [7, 8, 9]])) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(BannermatchError):
        overlap_at_k(a, a[:, :2])


# ------------------------------------------------------------------------------------------ end to end

def test_recipe_grid_is_the_product_and_skips_impossible_settings(caplog):
    grid = recipe_grid(["dino_vits16", "beit_base_pt22k_ft22k"], ["simple", "mean"], ["crop"], (False, True),
                       source="timm")
    labels = [r.label for r in grid]
    assert len(grid) == 6  # 2 strategies x (DINO with and without multiscale + timm BEiT without)
    assert "dino_vits16 mean+multiscale crop" in labels and "beit_base_pt22k_ft22k simple crop" in labels
    assert not any(r.model.startswith("beit") and r.multiscale for r in grid)
    assert "skipped beit_base_pt22k_ft22k simple crop multiscale" in caplog.text
    with pytest.raises(BannermatchError, match="unknown strategy"):
        recipe_grid(["dino_vits16"], ["best"])


def test_compare_two_tiny_recipes_then_reuse_everything(banner_dir, tiny_weights, tmp_path, monkeypatch):
    recipes = [make_recipe("dino_vits16", strategy, weights=tiny_weights, arch=TINY_ARCH)
               for strategy in ("simple", "gem")]
    store = tmp_path / "store"
    kwargs = dict(store=store, weights=tiny_weights, device="cpu", k=5, n_queries=6, seed=3,
                  transforms=["crop", "flip", "letterbox"], progress=False)
    loads = []
    real_load = evaluate.load_backbone
    monkeypatch.setattr(evaluate, "load_backbone", lambda *a: loads.append(1) or real_load(*a))
    monkeypatch.setattr(extraction, "load_backbone", lambda *a: loads.append(1) or real_load(*a))
    first = compare(banner_dir, recipes, **kwargs)
    assert len(loads) == 2  # one pass over the banners and one over the copies serve both strategies

    assert [r["slug"] for r in first.rows] == [r.slug for r in recipes]
    assert [r["label"] for r in first.rows] == [r.label for r in recipes]
    for row in first.rows:
        assert row["banners"] == len(APPS) and row["copy queries"] == 6 * 3 and row["cutoff"] == len(APPS)
        assert 0 <= row["copy recall@1"] <= row["copy recall@5"] <= 1
        assert 0 <= row[f"copy mAP@{len(APPS)}"] <= 1
        assert row["flip recall@1"] >= 0 and row["letterbox recall@5"] >= 0
        # the synthetic names hold franchises: Euro Truck, Half-Life, Portal, Counter-Strike, Civilization, Witcher
        assert row["franchise queries"] == 12
        assert row["franchise chance@5"] == pytest.approx(1 / 19)  # one other member among 19 other banners
    assert first.agreement.shape == (2, 2)
    assert np.allclose(np.diag(first.agreement), 1.0)
    assert np.allclose(first.agreement, first.agreement.T)

    markdown = first.to_markdown()
    assert all(r.label in markdown for r in recipes) and "overlap@5" in markdown
    paths = first.save(tmp_path / "out")
    with open(paths["csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [row["slug"] for row in table] == [r.slug for r in recipes]
    assert float(table[0]["copy recall@5"]) == pytest.approx(first.rows[0]["copy recall@5"])
    with Image.open(paths["png"]) as png:
        assert png.size[0] > 100
    assert paths["md"].read_text() == markdown

    manifests = {r.slug: (store / r.slug / MANIFEST).stat().st_mtime_ns for r in recipes}

    def no_model(*args, **kwargs):
        raise AssertionError("a second comparison loaded a model")

    monkeypatch.setattr(extraction, "load_backbone", no_model)
    monkeypatch.setattr(evaluate, "load_backbone", no_model)
    second = compare(banner_dir, recipes, **kwargs)
    assert second.rows == first.rows
    assert np.array_equal(second.agreement, first.agreement)
    assert {r.slug: (store / r.slug / MANIFEST).stat().st_mtime_ns for r in recipes} == manifests


def test_comparison_is_deterministic_for_a_seed(banner_dir, tiny_weights, tmp_path):
    recipe = make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)
    runs = [compare(banner_dir, [recipe], tmp_path / store, tiny_weights, "cpu", k=3, n_queries=4,
                    transforms=["jpeg", "colour", "overlay"], progress=False) for store in ("a", "b")]
    assert runs[0].rows == runs[1].rows  # features, copies and metrics all recomputed from scratch


def test_evaluate_cli(banner_dir, tiny_weights, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", str(banner_dir), "--models", "dino_vits16", "--strategies", "simple", "mean",
            "--weights", str(tiny_weights), "--arch", "embed_dim=48,depth=4,num_heads=3", "--dtype", "float32",
            "--device", "cpu", "-k", "3", "--queries", "3", "--transforms", "blur", "grayscale",
            "--store", str(tmp_path / "store"), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dino_vits16 simple crop" in printed and "dino_vits16 mean crop" in printed
    assert {p.name for p in out.iterdir()} == {"results.csv", "results.md", "results.png"}
    assert main([*argv, "-k", "25"]) == 2  # more neighbours than banners: one clear line, no traceback
    assert capsys.readouterr().err.startswith("bannermatch: error: k=25")
