"""Many hands on one pass: writers that do not clobber each other, readers that see one state, matches keyed to
the features' own bytes, stale files removed. The stress test runs real processes and kills one with SIGKILL."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from bannermatch import extract_features, find_matches, load_features, make_recipe
from bannermatch.files import file_digest
from bannermatch.store import FeatureStore

from conftest import TINY_ARCH

# batches of one banner: a banner's features do not depend on which others share its batch, so every writer
# computes bit-identical rows whatever images it was given
EMBED = {"workers": 0, "batch_size": 1, "chunk_size": 3, "dtype": "float32", "progress": False}


def _recipe(tiny_weights):
    return make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)


def _brute_force(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = features @ features.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def _assert_store_is_whole(path: Path, tidied: bool = True) -> dict:
    """Every listed segment exists with its true sha256 and holds the rows listed, no banner twice; ``tidied``:
    no segment file unlisted (a writer killed between writing and listing one leaves it to the next update)."""
    manifest = json.loads((path / "manifest.json").read_text())
    listed = [seg["file"] for seg in manifest["segments"]]
    for seg in manifest["segments"]:
        assert file_digest(path / seg["file"]) == seg["sha256"], seg["file"]
        with np.load(path / seg["file"], allow_pickle=False) as data:
            assert data["digest"].tolist() == seg["digests"]
    digests = [d for seg in manifest["segments"] for d in seg["digests"]]
    assert len(digests) == len(set(digests))
    if tidied:
        assert sorted(f.name for f in path.glob("seg_*")) == sorted(listed)
    return manifest


def _by_key(fs) -> dict[str, np.ndarray]:
    return dict(zip(fs.keys, fs.features))


# ---------------------------------------------------------------------------------- the same process, interleaved

def test_two_writers_with_their_own_manifest_copies_keep_each_others_segments(banner_dir, tiny_weights, tmp_path):
    """Bug: each writer rewrote the whole manifest from its own copy (the last one won) and both picked
    ``seg_00000.npz``, the second's bytes listed with a sha256 taken after the other's rename."""
    recipe = _recipe(tiny_weights)
    path = tmp_path / recipe.slug
    a = FeatureStore.open(path, recipe, create=True)
    b = FeatureStore.open(path, recipe, create=True)  # a second notebook, opened before the first wrote anything
    comps = {"cls": np.ones((2, 4, 48), np.float32), "mean": np.ones((2, 48), np.float32),
             "gem": np.ones((2, 48), np.float32)}
    run = {"dtype": "float32", "device": "cpu", "blocks": 4}
    a.add_segment([("10", "aaaa"), ("20", "bbbb")], comps, run, {"id-a": "aaaa"}, {})
    b.add_segment([("30", "cccc"), ("40", "dddd")], {n: v * 2 for n, v in comps.items()}, run, {"id-c": "cccc"},
                  {"eeee": "not an image"})
    b.add_segment([("20", "bbbb"), ("50", "ffff")], comps, run, {}, {})  # bbbb: stored by a meanwhile
    manifest = _assert_store_is_whole(path)
    assert [seg["digests"] for seg in manifest["segments"]] == [["aaaa", "bbbb"], ["cccc", "dddd"], ["ffff"]]
    assert manifest["identities"] == {"id-a": "aaaa", "id-c": "cccc"} and manifest["failed"] == {"eeee": "not an image"}


def test_the_last_run_to_finish_sets_the_collection_even_when_its_copy_looked_unchanged(tiny_weights, tmp_path):
    """Bug: ``record`` skipped the write when the collection equalled this process's own (stale) copy of the
    manifest, so a run that finished last left another run's collection in place."""
    recipe = _recipe(tiny_weights)
    path = tmp_path / recipe.slug
    first = {"entries": [["10", "aaaa"]], "names": {}, "images": "one"}
    setup = FeatureStore.open(path, recipe, create=True)
    setup.record({}, {}, first)
    a = FeatureStore.open(path, recipe)  # a notebook that will finish last, with `first` as its collection
    b = FeatureStore.open(path, recipe)
    b.record({}, {}, {"entries": [["20", "bbbb"]], "names": {}, "images": "two"})
    a.record({}, {}, first)
    assert json.loads((path / "manifest.json").read_text())["collection"] == first


def test_saved_matches_are_keyed_to_the_features_bytes(banner_dir, tiny_weights, tmp_path):
    """Bug: saved matches were keyed by keys and digests only, so matches of other features (rows that held other
    banners' features, since repaired) were reused for the right ones."""
    recipe = _recipe(tiny_weights)
    fs = extract_features(banner_dir, recipe, tmp_path, tiny_weights, **EMBED)
    find_matches(fs, 3, precision="float32")
    manifest = json.loads((fs.path / "manifest.json").read_text())
    seg = manifest["segments"][0]  # the same keys and digests, other features (as a clobbered segment had)
    with np.load(fs.path / seg["file"], allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    for name in ("cls", "mean", "gem"):
        arrays[name] = arrays[name][::-1].copy()
    np.savez(fs.path / seg["file"], **arrays)
    seg["sha256"] = file_digest(fs.path / seg["file"])
    (fs.path / "manifest.json").write_text(json.dumps(manifest))
    changed = load_features(fs.path, recipe)
    assert not np.array_equal(changed.features, fs.features)
    matches = find_matches(changed, 3, precision="float32")
    neighbours, scores = _brute_force(changed.features, 3)
    np.testing.assert_array_equal(matches.neighbours, neighbours)
    np.testing.assert_allclose(matches.scores, scores, atol=1e-5)


def test_damaged_segments_are_set_aside_and_stale_matches_removed(banner_dir, tiny_weights, tmp_path, caplog):
    """Bug: a damaged segment stayed in the folder beside its recomputed rows (``glob("seg_*.npz")`` read both)
    and every collection's saved matches stayed for good."""
    images = tmp_path / "images"
    shutil.copytree(banner_dir, images)
    recipe = _recipe(tiny_weights)
    fs = extract_features(images, recipe, tmp_path / "store", tiny_weights, **{**EMBED, "chunk_size": 8})
    first = find_matches(fs, 3, precision="float32").path
    manifest = json.loads((fs.path / "manifest.json").read_text())
    damaged = fs.path / manifest["segments"][1]["file"]
    damaged.write_bytes(damaged.read_bytes()[:100])
    (images / "10.jpg").unlink()  # another collection: the first one's matches are stale
    again = extract_features(images, recipe, tmp_path / "store", tiny_weights, **{**EMBED, "chunk_size": 8})
    assert (fs.path / "damaged" / damaged.name).is_file() and "moved to" in caplog.text
    _assert_store_is_whole(fs.path)
    keys = [k for f in sorted(fs.path.glob("seg_*.npz")) for k in np.load(f, allow_pickle=False)["key"].tolist()]
    assert sorted(keys) == sorted(fs.keys)  # what a plain numpy reader finds: every banner once
    second = find_matches(again, 3, precision="float32").path
    leftovers = [fs.path / "seg_0123456789abcdef.npz", fs.path / "seg_0123456789abcdef.npz.tmp4242"]
    for file in leftovers:  # what a writer killed between writing a segment and listing it leaves
        shutil.copy(fs.path / manifest["segments"][0]["file"], file)
    extract_features(images, recipe, tmp_path / "store", tiny_weights, **EMBED)  # nothing new: still tidied
    assert not any(file.exists() for file in leftovers)
    assert not first.exists() and not first.with_suffix(".json").exists()
    assert sorted(p.name for p in (fs.path / "matches").iterdir()) == sorted([second.name, second.with_suffix(".json").name])


# ---------------------------------------------------------------------------------- processes, one killed

def _writer(images: str, recipe, store: str, weights: str, out: str, delay: float) -> None:
    torch.set_num_threads(1)
    time.sleep(delay)
    fs = extract_features(images, recipe, store, weights, **EMBED)
    np.savez(out, keys=np.array(fs.keys), features=fs.features)


def _reader(images: str, recipe, store: str, weights: str, out: str, rounds: int) -> None:
    """A notebook beside the writers: extract_features, find_matches, and a plain load of the stored features."""
    torch.set_num_threads(1)
    for r in range(rounds):
        fs = extract_features(images, recipe, store, weights, **EMBED)
        matches = find_matches(fs, 3, precision="float32")
        np.savez(f"{out}.{r}.npz", keys=np.array(fs.keys), features=fs.features, neighbours=matches.neighbours,
                 scores=matches.scores)
        loaded = load_features(fs.path, recipe)
        np.savez(f"{out}.{r}.loaded.npz", keys=np.array(loaded.keys), features=loaded.features)


def test_writers_a_reader_and_a_killed_writer_leave_the_store_a_serial_run_makes(banner_dir, tiny_weights, tmp_path):
    recipe = _recipe(tiny_weights)
    keys = sorted(p.stem for p in banner_dir.glob("*.jpg"))
    sets = {"all": keys, "first": keys[:14], "last": keys[6:]}  # the same and overlapping image sets
    for name, subset in sets.items():
        (tmp_path / name).mkdir()
        shutil.copy(banner_dir / "apps.json", tmp_path / name)
        for key in subset:
            shutil.copy(banner_dir / f"{key}.jpg", tmp_path / name)
    serial = _by_key(extract_features(tmp_path / "all", recipe, tmp_path / "serial", tiny_weights, **EMBED))

    ctx = multiprocessing.get_context("forkserver")
    # children fork from a server that imported these once: no torch or timm import per process
    ctx.set_forkserver_preload(["bannermatch.extraction", "bannermatch.matches", "timm", "huggingface_hub", "tqdm.auto"])
    rng = random.Random(22)
    kills = 0
    for trial in range(3):
        store, results = tmp_path / f"store{trial}", tmp_path / f"results{trial}"
        results.mkdir()
        writers = [ctx.Process(target=_writer, args=(str(tmp_path / images), recipe, str(store), str(tiny_weights),
                                                     str(results / f"w{i}.npz"), 0.05 * i))
                   for i, images in enumerate(["all", "first", "last", "all"])]
        reader = ctx.Process(target=_reader, args=(str(tmp_path / "all"), recipe, str(store), str(tiny_weights),
                                                   str(results / "r"), 3))
        for p in [*writers, reader]:
            p.start()
        victim = rng.randrange(len(writers))
        time.sleep(rng.uniform(0.1, 1.0))
        try:
            os.kill(writers[victim].pid, signal.SIGKILL)
            kills += 1
        except ProcessLookupError:  # it finished first (a quiet machine): this trial has no kill
            pass
        for p in [*writers, reader]:
            p.join(120)
            assert p.exitcode is not None, "a process hung"
        assert reader.exitcode == 0 and all(p.exitcode == 0 for i, p in enumerate(writers) if i != victim)
        path = store / recipe.slug

        # whatever a finished writer embedded is stored (before any repair), and its features are the right rows
        stored = {d for seg in _assert_store_is_whole(path, tidied=False)["segments"] for d in seg["digests"]}
        for i, p in enumerate(writers):
            if p.exitcode == 0:
                with np.load(results / f"w{i}.npz") as got:
                    assert got["keys"].tolist() == sets[["all", "first", "last", "all"][i]]
                    for key, row in zip(got["keys"].tolist(), got["features"]):
                        assert np.array_equal(row, serial[key]), (trial, i, key)
        manifest = json.loads((path / "manifest.json").read_text())
        assert {d for _, d in manifest["collection"]["entries"]} <= stored

        # every FeatureSet the reader got has the right rows; every matches it was given equal brute force
        for file in sorted(results.glob("r.*.npz")):
            with np.load(file) as got:
                for key, row in zip(got["keys"].tolist(), got["features"]):
                    assert np.array_equal(row, serial[key]), (trial, file.name, key)
                if "neighbours" in got:
                    neighbours, scores = _brute_force(got["features"], 3)
                    np.testing.assert_array_equal(got["neighbours"], neighbours)
                    np.testing.assert_allclose(got["scores"], scores, atol=1e-5)

        # a serial run after them: the store a serial run makes, every saved matches file brute force on its features
        final = extract_features(tmp_path / "all", recipe, store, tiny_weights, **EMBED)
        assert final.keys == keys and all(np.array_equal(row, serial[k]) for k, row in _by_key(final).items())
        _assert_store_is_whole(path)
        assert not [f for f in path.rglob("*") if ".tmp" in f.name]
        for meta in (path / "matches").glob("*.json"):
            assert json.loads(meta.read_text())["features"] == final.content_id
            with np.load(meta.with_suffix(".npz")) as saved:
                np.testing.assert_array_equal(saved["neighbours"][:, :3], _brute_force(final.features, 3)[0])
    assert kills, "every writer had finished before its kill: no trial killed one"

