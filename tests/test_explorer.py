"""Explorer: drive the widgets as a user would and check the grid shows the right games."""

from __future__ import annotations

import re

import pytest

from bannermatch.errors import BannermatchError
from bannermatch.explorer import explore
from bannermatch import extract_features, make_recipe
from bannermatch import query
from conftest import APPS, TINY_ARCH


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
