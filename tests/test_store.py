"""The feature store: one forward pass for every strategy, only changed banners embedded, resumable, device-free."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bannermatch import BannermatchError, extract_features, find_matches, load_features, make_recipe, query
from bannermatch import extraction
from bannermatch.extraction import Preprocess, compute_features, load_backbone
from bannermatch.sources import Entry, ImageSource, Report, open_source
from bannermatch.store import FeatureStore, content_digest, list_feature_sets

from conftest import TINY_ARCH, draw_banner


def _recipe(tiny_weights, **kw):
    return make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH, **kw)


@pytest.fixture
def model_calls(monkeypatch):
    """How many images went through the model, counted where every embedding passes."""
    calls = []
    real = extraction.compute_components
    monkeypatch.setattr(extraction, "compute_components",
                        lambda b, x, r: calls.append(len(x)) or real(b, x, r))
    return calls


def _embed(images, recipe, store, weights, **kw):
    kw.setdefault("workers", 0)
    return extract_features(images, recipe, store, weights, progress=False, **kw)


def test_extract_store_resume_and_cache(banner_dir, tiny_weights, tmp_path, monkeypatch, model_calls):
    recipe = _recipe(tiny_weights)
    full = _embed(banner_dir, recipe, tmp_path / "a", tiny_weights, batch_size=4, chunk_size=6)
    assert len(full.keys) == 20 and full.features.shape == (20, 48) and sum(model_calls) == 20
    assert full.names["227300"] == "Euro Truck Simulator 2"

    # interrupted after two segments, then resumed: identical features, no image embedded twice
    written = []
    real_add = FeatureStore.add_segment

    def add_then_die(self, *args):
        real_add(self, *args)
        written.append(1)
        if len(written) == 2:
            raise KeyboardInterrupt

    model_calls.clear()
    monkeypatch.setattr(FeatureStore, "add_segment", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        _embed(banner_dir, recipe, tmp_path / "b", tiny_weights, batch_size=4, chunk_size=6)
    first = sum(model_calls)
    with pytest.raises(BannermatchError, match="incomplete"):
        load_features(tmp_path / "b" / recipe.slug)
    monkeypatch.setattr(FeatureStore, "add_segment", real_add)
    resumed = _embed(banner_dir, recipe, tmp_path / "b", tiny_weights, batch_size=4, chunk_size=6)
    assert sum(model_calls) - first == 20 - 12  # only the banners of the two missing segments were computed
    assert resumed.keys == full.keys
    np.testing.assert_array_equal(resumed.features, full.features)

    model_calls.clear()  # an identical recipe on the same images recomputes nothing, reads no image
    monkeypatch.setattr(extraction, "decode_pixels", lambda *a: pytest.fail("an unchanged banner was decoded"))
    again = _embed(banner_dir, recipe, tmp_path / "b", tiny_weights, chunk_size=6)
    assert model_calls == [] and again.keys == full.keys


def test_one_forward_pass_serves_every_strategy(banner_dir, tiny_weights, tmp_path, model_calls):
    simple = _embed(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights)
    assert sum(model_calls) == 20
    backbone = load_backbone(simple.recipe, tiny_weights, "cpu", "auto")  # the precision the pass was stored in
    transform = Preprocess(simple.recipe)
    x = torch.stack([transform(Image.open(banner_dir / f"{key}.jpg").convert("RGB")) for key in simple.keys[:4]])
    for strategy in ("complex", "gem", "mean"):
        recipe = _recipe(tiny_weights, strategy=strategy)
        assert recipe.slug == simple.recipe.slug  # the same store folder
        before = sum(model_calls)
        fs = _embed(banner_dir, recipe, tmp_path, tiny_weights)
        assert sum(model_calls) == before  # no new pass
        direct = compute_features(backbone, x, recipe)
        np.testing.assert_allclose(fs.features[:4], direct.numpy(), atol=2e-3)  # stored as float16
    # the explorer lists every strategy that was asked for
    assert sorted(fs.recipe.strategy for fs in list_feature_sets(tmp_path)) == ["complex", "gem", "mean", "simple"]


def test_only_new_and_changed_banners_are_embedded(banner_dir, tiny_weights, tmp_path, model_calls, monkeypatch):
    d = tmp_path / "imgs"
    shutil.copytree(banner_dir, d)
    recipe = _recipe(tiny_weights)
    _embed(d, recipe, tmp_path / "store", tiny_weights, chunk_size=8)
    find_matches(load_features(tmp_path / "store" / recipe.slug, recipe), 5, precision="float32")
    for i, appid in enumerate(["900001", "900002", "900003"]):  # M = 3 new
        draw_banner(500 + i).save(d / f"{appid}.jpg")
    for appid in ["570", "620"]:  # C = 2 changed
        draw_banner(int(appid)).save(d / f"{appid}.jpg")
    for appid in ["10", "70"]:  # R = 2 removed
        (d / f"{appid}.jpg").unlink()
    model_calls.clear()
    updated = _embed(d, recipe, tmp_path / "store", tiny_weights, chunk_size=8)
    assert sum(model_calls) == 3 + 2
    assert len(updated.keys) == 20 + 3 - 2 and not {"10", "70"} & set(updated.keys)

    # an update interrupted after its first segment (a kill between writes) loses nothing: the rerun ends the same
    for appid in ["910001", "910002", "910003", "910004", "910005"]:
        draw_banner(700 + int(appid) % 100).save(d / f"{appid}.jpg")
    real_add = FeatureStore.add_segment

    def add_then_die(self, *args):
        real_add(self, *args)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(FeatureStore, "add_segment", add_then_die)
        with pytest.raises(KeyboardInterrupt):
            _embed(d, recipe, tmp_path / "store", tiny_weights, chunk_size=2)
    model_calls.clear()
    updated = _embed(d, recipe, tmp_path / "store", tiny_weights, chunk_size=8)
    assert sum(model_calls) == 5 - 2  # the first segment of the killed update was kept

    scratch = _embed(d, recipe, tmp_path / "scratch", tiny_weights, chunk_size=8)
    assert updated.keys == scratch.keys
    np.testing.assert_array_equal(updated.features, scratch.features)
    np.testing.assert_array_equal(find_matches(updated, 5, precision="float32").neighbours,
                                  find_matches(scratch, 5, precision="float32").neighbours)

    # the same bytes under another name, or moved to another folder, are found, not embedded again
    model_calls.clear()
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    shutil.copy(d / "227300.jpg", moved / "999999.jpg")
    again = _embed(moved, recipe, tmp_path / "store", tiny_weights, chunk_size=8)
    assert model_calls == [] and len(again.keys) == len(updated.keys) + 1
    np.testing.assert_array_equal(again.features[again.index_of("999999")], again.features[again.index_of("227300")])


def test_store_folder_and_matches_do_not_depend_on_the_device_or_precision(banner_dir, tiny_weights, tmp_path,
                                                                          model_calls):
    recipe = _recipe(tiny_weights)
    bf16 = _embed(banner_dir, recipe, tmp_path, tiny_weights, dtype="bfloat16")
    model_calls.clear()
    fp32 = _embed(banner_dir, recipe, tmp_path, tiny_weights, dtype="float32")  # another machine: nothing to redo
    assert model_calls == [] and fp32.path == bf16.path
    manifest = json.loads((fp32.path / "manifest.json").read_text())
    assert {seg["dtype"] for seg in manifest["segments"]} == {"bfloat16"} and manifest["segments"][0]["device"] == "cpu"
    assert "dtype" not in recipe.to_dict()


def test_manifest_records_the_pass_and_segments_are_plain_numpy(banner_dir, tiny_weights, tmp_path):
    recipe = _recipe(tiny_weights)
    fs = _embed(banner_dir, recipe, tmp_path, tiny_weights, chunk_size=8)
    manifest = json.loads((fs.path / "manifest.json").read_text())
    assert manifest["recipe"] == recipe.pass_dict() and manifest["recipe"]["weights"].startswith("sha256:")
    assert manifest["collection"]["images"] == str(banner_dir.resolve())
    keys, digests = [], []
    for seg in manifest["segments"]:
        with np.load(fs.path / seg["file"], allow_pickle=False) as data:  # what another tool reads
            keys += data["key"].tolist()
            digests += data["digest"].tolist()
            assert data["cls"].shape == (seg["rows"], 4, 48) and data["mean"].shape == data["gem"].shape == (seg["rows"], 48)
    assert sorted(keys) == sorted(fs.keys) and sorted(digests) == sorted(fs.digests)


def test_corrupt_images_are_skipped_and_reported(banner_dir, tiny_weights, tmp_path):
    d = tmp_path / "imgs"
    shutil.copytree(banner_dir, d)
    (d / "999.jpg").write_bytes(b"")
    (d / "998.jpg").write_bytes(b"not an image at all")
    (d / "997.jpg").write_bytes((banner_dir / "10.jpg").read_bytes()[:500])
    fs = _embed(d, _recipe(tiny_weights), tmp_path / "f", tiny_weights)
    assert len(fs.keys) == 20 and not {"997", "998", "999"} & set(fs.keys)
    reasons = dict(fs.skipped)
    assert reasons["999"] == "empty file" and reasons["998"] == "not an image"
    assert reasons["997"].startswith("corrupt image")
    again = _embed(d, _recipe(tiny_weights), tmp_path / "f", tiny_weights)  # known failures: reported, not retried
    assert dict(again.skipped) == reasons


def test_the_images_folder_is_stored_absolute(banner_dir, tiny_weights, tmp_path, monkeypatch):
    """Bug: the folder was stored as typed (``banners``) and read from wherever the next command ran."""
    from bannermatch.display import banner_images

    monkeypatch.chdir(banner_dir.parent)
    fs = _embed(banner_dir.name, _recipe(tiny_weights), tmp_path / "store", tiny_weights)
    other = tmp_path / "elsewhere"
    (other / banner_dir.name).mkdir(parents=True)  # another folder with its own ./banners
    draw_banner(9999).save(other / banner_dir.name / "227300.jpg")
    monkeypatch.chdir(other)
    shown = banner_images(load_features(fs.path), ["227300"])["227300"]
    assert np.array_equal(np.asarray(shown), np.asarray(Image.open(banner_dir / "227300.jpg").convert("RGB")))


def test_keep_on_square_banners_says_so_in_one_line(tiny_weights, tmp_path, caplog):
    d = tmp_path / "square"
    d.mkdir()
    for i in range(3):
        draw_banner(i, size=(224, 224)).save(d / f"{100 + i}.jpg")
    draw_banner(7).save(d / "200.jpg")  # a real 2:3 banner is not padded
    with caplog.at_level(logging.WARNING):
        _embed(d, _recipe(tiny_weights, preprocess="keep"), tmp_path / "store", tiny_weights)
    lines = [r.getMessage() for r in caplog.records if "padded" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("keep: 3 banners are wider than 2:3")


def test_complex_blocks_beyond_what_a_pass_stores_are_refused(tiny_weights):
    with pytest.raises(BannermatchError, match="between 1 and 4"):
        _recipe(tiny_weights, strategy="complex", n_last_blocks=5)


def test_compiled_embedding_equals_eager_and_compiles_once(banner_dir, tiny_weights, tmp_path, caplog):
    recipe = _recipe(tiny_weights)
    # float32: the compiled graph computes what the eager model does (in bf16 each rounds at other places)
    eager = extract_features(banner_dir, recipe, tmp_path / "a", tiny_weights, batch_size=8, progress=False,
                             dtype="float32")
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    compiled = extract_features(banner_dir, recipe, tmp_path / "b", tiny_weights, batch_size=8, progress=False,
                                compile=True, dtype="float32")  # 20 banners: batches of 8, 8 and 4 (padded to 8)
    assert graphs["unique_graphs"] - before == 1 and "torch.compile failed" not in caplog.text
    assert compiled.keys == eager.keys
    np.testing.assert_allclose(compiled.features, eager.features, atol=2e-3)  # stored as float16


@pytest.mark.parametrize("gain,compiled_batches", [((0.0, 2.0), 2), ((1e9, 2.0), 0)])
def test_compiling_by_default_when_the_banners_left_outnumber_the_break_even(banner_dir, tiny_weights, tmp_path,
                                                                             monkeypatch, caplog, gain, compiled_batches):
    """compile=None: the first 3 batches run eager and time the model; the other 2 (of 20 banners in batches of 4)
    run compiled only if compiling pays for them on this device, and the log says so. The compiled model is
    stood in for (compiling takes minutes on 2 cores); the choice is what is tested."""
    compiled = []

    class Compiled:
        def __init__(self, backbone, recipe, batch_size):
            self.backbone, self.recipe = backbone, recipe

        def __call__(self, images):
            compiled.append(len(images))
            return extraction.compute_components(self.backbone, images, self.recipe)

    monkeypatch.setattr(extraction, "CompiledEmbedder", Compiled)
    monkeypatch.setattr(extraction, "COMPILE_GAINS", {("cpu", "float32"): gain})
    recipe = _recipe(tiny_weights)
    with caplog.at_level(logging.INFO, logger="bannermatch"):
        eager = _embed(banner_dir, recipe, tmp_path / "a", tiny_weights, batch_size=4, dtype="float32", compile=False)
        assert compiled == [] and "torch.compile" not in caplog.text  # asked not to: not even weighed
        fs = _embed(banner_dir, recipe, tmp_path / "b", tiny_weights, batch_size=4, dtype="float32")
    assert compiled == [4] * compiled_batches
    verdict = "compiling" if compiled_batches else "not compiling"
    assert len([r for r in caplog.records if r.getMessage().startswith("torch.compile pays from about")
                and r.getMessage().endswith(f"8 left: {verdict}")]) == 1
    np.testing.assert_array_equal(fs.features, eager.features)


def test_compiling_pays_only_where_it_was_measured_to(monkeypatch):
    monkeypatch.setattr(extraction, "COMPILE_GAINS", {("cpu", "bfloat16"): (20.0, 1.25)})
    # 20 s of compiling saves 10 ms x (1 - 1/1.25) = 2 ms an image: 10,000 images
    assert extraction.compile_break_even(0.010, torch.device("cpu"), "bfloat16") == pytest.approx(10_000)
    assert extraction.compile_break_even(0.010, torch.device("cpu"), "float32") is None  # AVX2: slower compiled
    assert extraction.compile_break_even(0.010, torch.device("cuda"), "bfloat16") is None  # unmeasured
    monkeypatch.setattr(extraction, "COMPILE_GAINS", {("cpu", "bfloat16"): (20.0, 1.0)})
    assert extraction.compile_break_even(0.010, torch.device("cpu"), "bfloat16") is None  # no faster: never


def test_embedding_goes_on_eager_when_compiling_fails(banner_dir, tiny_weights, tmp_path, caplog, monkeypatch):
    class BrokenCompile:  # what torch.compile returns: the module's attributes, a forward that fails on first use
        def __init__(self, module, **kwargs):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def __call__(self, *args, **kwargs):
            raise RuntimeError("C++ compile error: cannot find a compiler\nlong log ...")

    recipe = _recipe(tiny_weights)
    eager = extract_features(banner_dir, recipe, tmp_path / "a", tiny_weights, progress=False)
    monkeypatch.setattr(torch, "compile", BrokenCompile)
    fs = extract_features(banner_dir, recipe, tmp_path / "b", tiny_weights, progress=False, compile=True)
    assert caplog.text.count("torch.compile failed, embedding without it: C++ compile error") == 1
    np.testing.assert_array_equal(fs.features, eager.features)


def test_dataloader_workers_give_the_same_features(banner_dir, tiny_weights, tmp_path):
    recipe = _recipe(tiny_weights)
    a = extract_features(banner_dir, recipe, tmp_path / "a", tiny_weights, workers=0, batch_size=3, progress=False)
    b = extract_features(banner_dir, recipe, tmp_path / "b", tiny_weights, workers=2, batch_size=3, chunk_size=7, progress=False)
    assert a.keys == b.keys
    np.testing.assert_allclose(a.features, b.features, atol=2e-3)  # stored as float16


@pytest.mark.parametrize("model_ms, loaders", [(0.001, [0, 2]), (1e4, [0])])
def test_decoding_processes_follow_the_measured_pace(tiny_weights, tmp_path, monkeypatch, caplog, model_ms, loaders):
    """With a GPU (``workers`` None) the first batches are decoded here and timed against the model's time, which
    the caller reports: a model far faster than decoding gets decoding processes (at most one per core) for the
    rest, a slow one keeps decoding inline. Every banner comes through once, copies of bytes seen before the
    switch are settled after it, not embedded again, and a broken file is skipped."""
    for i in range(12):
        draw_banner(i).save(tmp_path / f"{100 + i}.jpg", quality=90)
    for copy, of in (("102", "100"), ("112", "100"), ("114", "104")):  # bytes seen before, inline and after the switch
        shutil.copy(tmp_path / f"{of}.jpg", tmp_path / f"{copy}.jpg")
    for broken in ("103", "113"):  # bytes of their own: same broken bytes would be settled like any copy
        (tmp_path / f"{broken}.jpg").write_bytes(b"\xff\xd8 not a jpeg " + broken.encode())
    monkeypatch.setattr(extraction, "_usable_cpus", lambda: 2)
    made = []  # the decoding processes of each DataLoader the batches come from
    real_loader = extraction.DataLoader
    monkeypatch.setattr(extraction, "DataLoader",
                        lambda *a, **kw: made.append(kw["num_workers"]) or real_loader(*a, **kw))
    source, recipe, pace = open_source(tmp_path), _recipe(tiny_weights), extraction._Pace()
    embedded, settled, skipped, seen = {}, {}, {}, []
    with caplog.at_level(logging.INFO, "bannermatch.extraction"):
        for batch in extraction._decoded_batches(source, list(range(len(source))), set(), recipe, 3, None, pace):
            seen += [*batch["indices"], *(i for i, _ in batch["settled"]), *(i for i, _, _ in batch["skipped"])]
            embedded.update(zip(batch["indices"], batch["digests"]))
            settled.update(batch["settled"])
            skipped.update((i, reason) for i, _, reason in batch["skipped"])
            pace.modelled(len(batch["indices"]), model_ms / 1e3 * len(batch["indices"]))
    key = {e.key: i for i, e in enumerate(source.entries)}
    digest = {k: content_digest((tmp_path / f"{k}.jpg").read_bytes()) for k in key}
    assert made == loaders and ("2 decoding processes" if len(loaders) > 1 else "decoding inline") in caplog.text
    assert sorted(seen) == list(range(15))  # every banner once
    new = [k for k in map(str, range(100, 112)) if k not in ("102", "103")]
    assert embedded == {key[k]: digest[k] for k in new}
    assert settled == {key["102"]: digest["100"], key["112"]: digest["100"], key["114"]: digest["104"]}
    assert sorted(skipped) == sorted([key["103"], key["113"]])


def test_recipe_mismatch_is_refused(banner_dir, tiny_weights, tmp_path):
    fs = extract_features(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights, workers=0, progress=False)
    with pytest.raises(BannermatchError, match="another recipe.*preprocess"):
        load_features(fs.path, _recipe(tiny_weights, preprocess="squash"))
    with pytest.raises(BannermatchError, match="same --weights"):
        query(fs, str(banner_dir / "10.jpg"))  # a new image needs the very weights the features were made with


def test_a_sampled_pass_is_read_as_the_sample_until_the_collection_is_embedded(banner_dir, tiny_weights, tmp_path,
                                                                               model_calls, caplog):
    recipe = _recipe(tiny_weights)
    sample = _embed(banner_dir, recipe, tmp_path, tiny_weights, limit=5, include=["227300"])
    assert len(sample.keys) == 5 and "227300" in sample.keys and sum(model_calls) == 5
    assert sample.keys == _embed(banner_dir, recipe, tmp_path / "again", tiny_weights, limit=5, include=["227300"]).keys
    # bug: a pass that holds only a sample was "incomplete" for match, show, gallery, and skipped by the explorer
    loaded = load_features(sample.path)
    assert loaded.keys == sample.keys and loaded.size == sample.size == "5 banners, a sample of 20"
    assert "holds only a sample (embed --limit) of 5 of 20 banners" in caplog.text
    assert [fs.size for fs in list_feature_sets(tmp_path)] == ["5 banners, a sample of 20"]
    outside = next(p.stem for p in sorted(banner_dir.glob("*.jpg")) if p.stem not in sample.keys)
    with pytest.raises(BannermatchError, match=r"not in this feature set \(5 banners, a sample of 20\)"):
        query(loaded, outside)
    np.testing.assert_array_equal(find_matches(loaded, 2).neighbours, find_matches(sample, 2).neighbours)
    model_calls.clear()
    full = _embed(banner_dir, recipe, tmp_path, tiny_weights)
    assert sum(model_calls) == 20 - 5 and load_features(full.path).size == "20 banners"
    sample_matches, full_matches = find_matches(sample, 2), find_matches(full, 2)
    assert sample_matches.path != full_matches.path  # neither overwrites the other
    assert sample_matches.path.exists() and full_matches.path.exists()


def test_samples_are_chosen_by_app_id_and_hardly_move_when_games_are_added(tmp_path):
    """Bug: samples were drawn by listing position: new games, or one query included, changed most of a sample
    (every cell and update embedded another one)."""
    def sample(ids, n=200, include=()):
        entries = [Entry(str(i), str(tmp_path / f"{i}.jpg"), "", 1) for i in ids]
        return {e.key for e in ImageSource(tmp_path, entries, Report()).sample(n, include=include).entries}

    games = range(1000, 3000)
    before = sample(games)
    assert len(before) == 200 and sample(reversed(games)) == before  # the listing's order plays no part
    after = sample([*games, *range(5000, 5100)])  # 100 new games: about 200 * 100 / 2100 = 10 of them come in
    assert len(before - after) <= 25
    with_query = sample(games, include=["2999"])  # the side-by-side cell's query: one banner instead of another
    assert "2999" in with_query and len(with_query - before) <= 1


def test_estimated_time_follows_the_network():
    from bannermatch.extraction import estimate_seconds

    # timed on the real networks with random weights (nothing downloaded): ViT-S/8 has 4x the tokens of ViT-S/16
    small = estimate_seconds(make_recipe("dino_vits16"), 1000, "cpu")
    fine = estimate_seconds(make_recipe("dino_vits8"), 1000, "cpu")
    assert 0 < small < fine and fine / small > 2
    assert estimate_seconds(make_recipe("dino_vits16"), 0, "cpu") == 0
