"""Core library: models, strategies, feature store, search, queries."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bannermatch import BannermatchError, extract_features, find_matches, load_features, make_recipe, query
from bannermatch import features as features_mod
from bannermatch import search as search_mod
from bannermatch.features import build_transform, compute_features, load_backbone
from bannermatch.models import create_model, list_models
from bannermatch.search import top_k

from conftest import APPS, TINY_ARCH

TINY_BEIT = {"embed_dim": 48, "depth": 4, "num_heads": 3}
TINY_VITB = {"embed_dim": 768, "depth": 1, "num_heads": 12}  # ViT-B width: `complex` switches to CLS + mean patch


def _recipe(tiny_weights, **kw):
    kw.setdefault("device", "cpu")
    return make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH, **kw)


def _batch(recipe, n=3):
    t = build_transform(recipe)
    from conftest import draw_banner

    return torch.stack([t(draw_banner(100 + i)) for i in range(n)])


# ------------------------------------------------------------------------------------------ models

def test_registry_lists_every_family_with_preprocessing():
    names = {m.name: m for m in list_models()}
    for n in ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dinov2_vits14", "dinov2_vitb14",
              "dinov2_vitl14", "beit_base_pt22k", "beit_base_pt22k_ft22k", "beit_large_pt22k_ft22k_ft1k"]:
        assert n in names
    assert names["dino_vitb16"].sources == ("timm", "hub")
    assert names["beit_base_pt22k"].sources == ("hf",)  # the self-supervised BEiT is only on the HF hub
    assert names["beit_base_pt22k"].mean == (0.5, 0.5, 0.5)
    assert names["dinov2_vits14"].patch_size == 14


def test_unknown_model_lists_valid_names():
    with pytest.raises(BannermatchError, match="choose one of: dino_vits16"):
        create_model("dino_vitz16")
    with pytest.raises(BannermatchError, match="sources: hf"):
        make_recipe("beit_base_pt22k", source="timm")


def test_local_checkpoint_loads_as_real_weights(tiny_weights):
    saved = torch.load(tiny_weights, weights_only=True)
    model = create_model("dino_vits16", "timm", weights=tiny_weights, arch=TINY_ARCH).model
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_safetensors_weights_and_mismatched_weights(tiny_weights, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(torch.load(tiny_weights, weights_only=True), path)
    a = create_model("dino_vits16", weights=path, arch=TINY_ARCH).model.state_dict()
    b = torch.load(tiny_weights, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(BannermatchError, match="do not fit"):
        create_model("dino_vits16", weights=tiny_weights, arch={"embed_dim": 96, "depth": 4, "num_heads": 3})


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(BannermatchError, match="refusing to load"):
        create_model("dino_vits16", weights=path, arch=TINY_ARCH)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("model,source,arch", [
    ("dino_vits16", "timm", TINY_ARCH),
    ("dino_vitb16", "timm", TINY_VITB),
    ("dinov2_vits14", "timm", TINY_ARCH),
    ("beit_base_pt22k_ft22k", "timm", TINY_BEIT),
    ("beit_base_pt22k", "hf", {"hidden_size": 48, "num_attention_heads": 3,
                               "intermediate_size": 96, "use_mean_pooling": True, "use_relative_position_bias": True,
                               "num_hidden_layers": 4}),
])
@pytest.mark.parametrize("strategy", ["simple", "complex", "gem", "mean"])
def test_feature_sizes_follow_the_formulas(model, source, arch, strategy):
    recipe = make_recipe(model, strategy, "keep" if strategy == "gem" else "crop", source=source, arch=arch, device="cpu")
    backbone = load_backbone(recipe)
    d = backbone.embed_dim
    expected = {"simple": d, "mean": d, "gem": 2 * d,
                "complex": 4 * d if d < 768 else 2 * d}[strategy]
    feats = compute_features(backbone, _batch(recipe, 2), recipe)
    assert feats.shape == (2, expected)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5)


def test_complex_is_the_concatenation_of_intermediate_tokens(tiny_weights):
    recipe = _recipe(tiny_weights, strategy="complex", dtype="float32")
    assert (recipe.n_last_blocks, recipe.avgpool) == (4, False)  # ViT-S: DINO eval_linear defaults
    backbone = load_backbone(recipe, tiny_weights)
    x = _batch(recipe)
    tokens = backbone(x, 4)
    by_hand = torch.cat([tokens[i][:, 0] for i in range(4)], dim=-1)
    assert torch.allclose(compute_features(backbone, x, recipe), torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-5)
    # with avgpool: the final CLS tokens plus the mean of the final patch tokens
    pooled = make_recipe("dino_vits16", "complex", weights=tiny_weights, arch=TINY_ARCH, n_last_blocks=2, avgpool=True,
                         dtype="float32", device="cpu")
    by_hand = torch.cat([tokens[2][:, 0], tokens[3][:, 0], tokens[3][:, 1:].mean(1)], dim=-1)
    assert torch.allclose(compute_features(backbone, x, pooled), torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-5)


def test_timm_tokens_match_timm_forward_features(tiny_weights):
    backbone = create_model("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(backbone(x, 1)[-1], backbone.model.forward_features(x), atol=1e-5)


def test_multiscale_batch_of_one_equals_batch_of_eight(tiny_weights):
    recipe = _recipe(tiny_weights, multiscale=True, dtype="float32")
    backbone = load_backbone(recipe, tiny_weights)
    x = _batch(recipe, 8)
    together = compute_features(backbone, x, recipe)
    alone = torch.cat([compute_features(backbone, x[i:i + 1], recipe) for i in range(8)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together, compute_features(backbone, x, _recipe(tiny_weights, dtype="float32")), atol=1e-3)


def test_preprocessing_modes_keep_the_banner_shape(tiny_weights):
    img = Image.new("RGB", (300, 450))
    for mode, size in [("crop", (224, 224)), ("squash", (224, 224)), ("keep", (336, 224))]:
        assert build_transform(_recipe(tiny_weights, preprocess=mode))(img).shape == (3, *size)


def test_hub_source_loads_through_torch_hub(tmp_path, monkeypatch):
    """torch.hub.load on a cached facebookresearch/dino checkout: the real code path, offline."""
    hub = tmp_path / "hub"
    repo = hub / "facebookresearch_dino_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(
        "import timm, torch\n"
        "class DinoViT(timm.models.vision_transformer.VisionTransformer):\n"
        "    def get_intermediate_layers(self, x, n=1):  # DINO's API: normed outputs of the last n blocks\n"
        "        x = self._pos_embed(self.patch_embed(x))\n"
        "        out = []\n"
        "        for i, blk in enumerate(self.blocks):\n"
        "            x = blk(x)\n"
        "            if len(self.blocks) - i <= n: out.append(self.norm(x))\n"
        "        return out\n"
        "def dino_vits16(pretrained=True, **kw):\n"
        "    return DinoViT(patch_size=16, embed_dim=48, depth=3, num_heads=3, num_classes=0)\n"
    )
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    backbone = create_model("dino_vits16", "hub")
    tokens = backbone(torch.randn(1, 3, 224, 224), 2)
    assert len(tokens) == 2 and tokens[-1].shape == (1, 197, 48)


def test_hf_beit_local_folder_uses_true_cls(tmp_path):
    from transformers import BeitConfig, BeitModel

    cfg = BeitConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                     use_mean_pooling=True, use_relative_position_bias=True)
    torch.manual_seed(0)
    BeitModel(cfg, add_pooling_layer=True).save_pretrained(tmp_path / "beit")
    backbone = create_model("beit_base_pt22k", "hf", weights=tmp_path / "beit")
    x = torch.randn(1, 3, 224, 224)
    ref = backbone.model(pixel_values=x)
    assert torch.allclose(backbone(x)[-1][:, 0], ref.last_hidden_state[:, 0], atol=1e-5)
    recipe = make_recipe("beit_base_pt22k", "mean", source="hf", weights=tmp_path / "beit", dtype="float32", device="cpu")
    mean = compute_features(backbone, x, recipe)  # BEiT's own pooling = the model's pooler output
    assert torch.allclose(mean, torch.nn.functional.normalize(ref.pooler_output, dim=-1), atol=1e-5)


# ------------------------------------------------------------------------------------------ feature store

def test_extract_store_resume_and_cache(banner_dir, tiny_weights, tmp_path, monkeypatch):
    recipe = _recipe(tiny_weights)
    calls = []
    real_compute = features_mod.compute_features
    monkeypatch.setattr(features_mod, "compute_features", lambda b, x, r: calls.append(len(x)) or real_compute(b, x, r))
    full = extract_features(banner_dir, recipe, tmp_path / "a", tiny_weights, batch_size=4, workers=0, chunk_size=6, progress=False)
    assert len(full.keys) == 20 and full.features.shape == (20, 48) and sum(calls) == 20
    assert full.names["227300"] == "Euro Truck Simulator 2"

    # interrupted after two chunks, then resumed: identical features, no image embedded twice
    written = []
    real_write = features_mod._write_chunk

    def write_then_die(*args):
        real_write(*args)
        written.append(args[2])
        if len(written) == 2:
            raise KeyboardInterrupt

    calls.clear()
    monkeypatch.setattr(features_mod, "_write_chunk", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_features(banner_dir, recipe, tmp_path / "b", tiny_weights, batch_size=4, workers=0, chunk_size=6, progress=False)
    first = sum(calls)
    with pytest.raises(BannermatchError, match="incomplete"):
        load_features(tmp_path / "b" / recipe.slug)
    monkeypatch.setattr(features_mod, "_write_chunk", real_write)
    resumed = extract_features(banner_dir, recipe, tmp_path / "b", tiny_weights, batch_size=4, workers=0, chunk_size=6, progress=False)
    assert sum(calls) - first == 20 - 12  # only the two missing chunks (6 + 2 images) were computed
    assert resumed.keys == full.keys
    np.testing.assert_array_equal(resumed.features, full.features)

    calls.clear()  # an identical recipe on the same images recomputes nothing
    again = extract_features(banner_dir, recipe, tmp_path / "b", tiny_weights, workers=0, chunk_size=6, progress=False)
    assert calls == [] and again.keys == full.keys


def test_weights_identity_is_hashed_once_but_follows_a_changed_file(tmp_path, monkeypatch):
    from bannermatch import models as models_mod

    path = tmp_path / "w.pth"
    path.write_bytes(b"a" * 1000)
    first = models_mod.weights_identity(path)
    reads = []
    monkeypatch.setattr(models_mod, "file_digest", lambda f, h: reads.append(f) or h.update(f.read_bytes()))
    assert models_mod.weights_identity(path) == first and reads == []  # same file: not read again
    path.write_bytes(b"b" * 1000)  # same size, new content and modification time
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert models_mod.weights_identity(path) != first and reads == [path.resolve()]
    link = tmp_path / "model.safetensors"  # as in a Hugging Face snapshot: a link to a blob named by its hash
    link.symlink_to(path)
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert models_mod.weights_identity(link) == models_mod.weights_identity(copy)  # the name given is hashed


def test_cpu_batch_size_follows_the_token_count():
    assert features_mod.default_batch_size(make_recipe("dino_vits16", dtype="float32"), "cpu") == 20  # 197 tokens
    assert features_mod.default_batch_size(make_recipe("dino_vits8", dtype="float32"), "cpu") == 5  # 785 tokens
    keep = make_recipe("dino_vitb16", preprocess="keep", dtype="float32")
    assert keep.tokens() == 21 * 14 + 1 and features_mod.default_batch_size(keep, "cpu") == 13


def test_plain_attention_on_cpu_computes_what_the_fused_kernel_does(tiny_weights):
    recipe = _recipe(tiny_weights, dtype="float32")  # exact agreement; bf16 would differ by its rounding
    backbone = load_backbone(recipe, tiny_weights, "cpu")
    assert not any(block.attn.fused_attn for block in backbone.model.blocks)  # the faster one on CPU
    x = _batch(recipe, 4)
    plain = compute_features(backbone, x, recipe)
    backbone.set_fused_attention(True)
    assert all(block.attn.fused_attn for block in backbone.model.blocks)
    torch.testing.assert_close(compute_features(backbone, x, recipe), plain, atol=1e-5, rtol=1e-5)


def test_compiled_embedding_equals_eager_and_compiles_once(banner_dir, tiny_weights, tmp_path, caplog):
    recipe = _recipe(tiny_weights, dtype="float32")
    eager = extract_features(banner_dir, recipe, tmp_path / "a", tiny_weights, batch_size=8, progress=False)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    compiled = extract_features(banner_dir, recipe, tmp_path / "b", tiny_weights, batch_size=8, progress=False,
                                compile=True)  # 20 banners: batches of 8, 8 and 4 (padded to 8)
    assert graphs["unique_graphs"] - before == 1 and "torch.compile failed" not in caplog.text
    assert compiled.keys == eager.keys
    np.testing.assert_allclose(compiled.features, eager.features, atol=2e-3)  # stored as float16


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


def test_recipe_mismatch_is_refused(banner_dir, tiny_weights, tmp_path):
    fs = extract_features(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights, workers=0, progress=False)
    with pytest.raises(BannermatchError, match="another recipe.*strategy"):
        load_features(fs.path, _recipe(tiny_weights, strategy="gem"))
    with pytest.raises(BannermatchError, match="same --weights"):
        query(fs, str(banner_dir / "10.jpg"))  # a new image needs the very weights the features were made with


def test_corrupt_images_are_skipped_and_reported(banner_dir, tiny_weights, tmp_path):
    import shutil

    d = tmp_path / "imgs"
    shutil.copytree(banner_dir, d)
    (d / "999.jpg").write_bytes(b"")
    (d / "998.jpg").write_bytes(b"not an image at all")
    (d / "997.jpg").write_bytes((banner_dir / "10.jpg").read_bytes()[:500])
    fs = extract_features(d, _recipe(tiny_weights), tmp_path / "f", tiny_weights, workers=0, progress=False)
    assert len(fs.keys) == 20 and not {"997", "998", "999"} & set(fs.keys)
    reasons = dict(fs.skipped)
    assert reasons["999"] == "empty file" and reasons["998"] == "not an image"
    assert reasons["997"].startswith("corrupt image")


# ------------------------------------------------------------------------------------------ search

def _all_pairs_top_k(x, k, **kw):
    """``top_k`` of every row against all rows, itself excluded: the general path and the symmetric one."""
    return top_k(x, x, k, exclude=np.arange(len(x)), **kw), search_mod.top_k_all_pairs(x, k, **kw)


@pytest.mark.parametrize("n,d,k", [(103, 16, 7), (64, 8, 1)])
def test_search_equals_brute_force(n, d, k, monkeypatch):
    monkeypatch.setattr(search_mod, "_CHUNK_BYTES", 4 * n * 10)  # 10-row chunks: N is not a multiple
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    ref = np.argsort(-full, axis=1, kind="stable")[:, :k]
    for idx, scores in _all_pairs_top_k(x, k):
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_allclose(scores, np.take_along_axis(full, ref, 1), atol=1e-6)
        assert not (idx == np.arange(n)[:, None]).any()


@pytest.mark.parametrize("copies", [6, 40])  # 40: more tied duplicates than the extra candidates kept
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_ties_are_broken_by_index_across_the_kth_place(copies, precision, monkeypatch):
    base = np.eye(4, dtype=np.float32)
    x = np.concatenate([base[[0]]] * copies + [base[[1]]] * 3)  # identical banners: ties for k=3
    monkeypatch.setattr(search_mod, "_CHUNK_BYTES", 4 * len(x) * 7)  # the ties span several blocks
    for idx, scores in _all_pairs_top_k(x, 3, precision=precision):
        assert idx[0].tolist() == [1, 2, 3] and idx[copies - 1].tolist() == [0, 1, 2]
        assert idx[copies + 1].tolist() == [copies, copies + 2, 0]
        assert np.all(scores[:copies] == 1.0) and scores[copies + 1].tolist() == [1.0, 1.0, 0.0]
        for _ in range(2):
            assert np.array_equal(search_mod.top_k_all_pairs(x, 3, precision=precision)[0], idx)


def _reference_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Brute force in float64, each row's scores summed elementwise (identical vectors score identically)."""
    x64 = x.astype(np.float64)
    out = []
    for i in range(len(x)):
        scores = (x64[i] * x64).sum(axis=1)
        scores[i] = -np.inf
        out.append(np.argsort(-scores, kind="stable")[:k])
    return np.array(out)


@pytest.mark.parametrize("scale", [1.0, 100.0])  # unit vectors, and features that were never normalised
def test_duplicate_banners_tie_exactly_wherever_the_blocks_fall(scale, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) / scale
    copies = np.sort(rng.choice(1500, 150, replace=False))
    x[copies] = x[copies[0]]  # one banner 150 times: a matrix product rounds its scores by position
    monkeypatch.setattr(search_mod, "_CHUNK_BYTES", 4 * len(x) * 250)  # 6 blocks
    ref = _reference_top_k(x, 10)
    for idx, scores in _all_pairs_top_k(x, 10):
        np.testing.assert_array_equal(idx, ref)
        assert np.all(np.diff(scores, axis=1) <= 0)
    assert ref[copies[-1]].tolist() == copies[:10].tolist()  # a copy's matches: the first copies, in order


def test_all_pairs_search_equals_the_general_search_on_clustered_features(monkeypatch):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((150, 48))
    x = (centres[rng.integers(0, 150, 3001)] + 0.3 * rng.standard_normal((3001, 48))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # close neighbours, as in a game series
    monkeypatch.setattr(search_mod, "_CHUNK_BYTES", 4 * len(x) * 500)  # 7 blocks, the last one short
    for precision in search_mod.PRECISIONS:
        (idx, scores), (pair_idx, pair_scores) = _all_pairs_top_k(x, 10, precision=precision)
        np.testing.assert_array_equal(pair_idx, idx)
        np.testing.assert_allclose(pair_scores, scores, atol=1e-6)


def test_bf16_search_and_faiss_agree_with_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact, scores = top_k(x, x, 10, np.arange(2000))
    for fast, fast_scores in _all_pairs_top_k(x, 10, precision="bfloat16"):
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, fast)])
        assert recall >= 0.99
        same = fast == exact
        np.testing.assert_allclose(fast_scores[same], scores[same], atol=1e-6)  # rescored exactly in fp32
    f_idx, f_scores = search_mod.top_k_faiss(x, x, 10, np.arange(2000))
    assert np.mean(f_idx == exact) > 0.999
    np.testing.assert_allclose(f_scores, scores, atol=1e-5)


def test_k_larger_than_collection_is_an_error():
    x = np.eye(5, dtype=np.float32)
    with pytest.raises(BannermatchError, match="k=5 is larger than the 4"):
        top_k(x, x, 5, exclude=np.arange(5))


# ------------------------------------------------------------------------------------------ matching and queries

def test_matches_saved_and_near_duplicate_is_top1(banner_dir, tiny_weights, tmp_path):
    import shutil

    d = tmp_path / "imgs"
    shutil.copytree(banner_dir, d)
    original = Image.open(banner_dir / "227300.jpg")
    buf = io.BytesIO()
    original.resize((290, 436)).save(buf, "JPEG", quality=60)  # re-encoded and slightly resized
    (d / "999999.jpg").write_bytes(buf.getvalue())
    fs = extract_features(d, _recipe(tiny_weights), tmp_path / "f", tiny_weights, workers=0, progress=False)
    m = find_matches(fs, k=5)
    assert m.of("999999")[0][0] == "227300"  # the near-duplicate finds its original first
    assert m.neighbours.dtype == np.int64
    assert np.load(fs.path / "neighbours.npy").shape == (21, 5)
    again = find_matches(fs, k=3)  # reused from disk, sliced
    np.testing.assert_array_equal(again.neighbours, m.neighbours[:, :3])


def test_query_by_key_name_and_new_image(banner_dir, tiny_weights, tmp_path):
    fs = extract_features(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights, workers=0, progress=False)
    by_key, by_name, by_image = query(fs, ["227300", "euro truck simulator 2", str(banner_dir / "227300.jpg")],
                                      k=3, weights=tiny_weights)
    assert by_key.key == by_name.key == "227300" and by_key.name == "Euro Truck Simulator 2"
    assert by_key.matches == by_name.matches and "227300" not in [k for k, _ in by_key.matches]
    assert by_image.key is None and by_image.matches[0][0] == "227300" and by_image.matches[0][1] > 0.99
    with pytest.raises(BannermatchError, match="no game in this feature set"):
        query(fs, "definitely not a game title")
    with pytest.raises(BannermatchError, match="not in this feature set"):
        query(fs, "123456789")


def test_show_matches_draws_query_and_topk(banner_dir, tiny_weights, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from bannermatch.display import show_matches

    fs = extract_features(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights, workers=0, progress=False)
    fig = show_matches(fs, "Euro Truck Simulator 2", k=10, save=tmp_path / "grid.png")
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 11  # query + 10 matches, each with its banner
    titles = [ax.get_title() for ax in drawn]
    assert titles[0].startswith("QUERY\nEuro Truck Simulator 2") and "227300" in titles[0]
    assert all(any(APPS[k][:10] in t for k in APPS) for t in titles[1:])
    assert Image.open(tmp_path / "grid.png").size[0] > 500


def test_manifest_records_recipe_and_fingerprint(banner_dir, tiny_weights, tmp_path):
    recipe = _recipe(tiny_weights)
    fs = extract_features(banner_dir, recipe, tmp_path, tiny_weights, workers=0, progress=False)
    manifest = json.loads((fs.path / "manifest.json").read_text())
    assert manifest["recipe"] == recipe.to_dict() and manifest["recipe"]["weights"].startswith("sha256:")
    assert len(manifest["fingerprint"]) == 16 and manifest["library"]
