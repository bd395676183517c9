"""Backbones and pooling: the registry, weights in each source's published layout, token layouts, strategies."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bannermatch import BannermatchError, make_recipe
from bannermatch import backbones as backbones_mod
from bannermatch.backbones import create_model, list_models
from bannermatch.extraction import build_transform, compute_features, load_backbone
from bannermatch.recipe import default_batch_size

from conftest import TINY_ARCH

TINY_BEIT = {"embed_dim": 48, "depth": 4, "num_heads": 3}
TINY_VITB = {"embed_dim": 768, "depth": 1, "num_heads": 12}  # ViT-B width: `complex` switches to CLS + mean patch


def _recipe(tiny_weights, **kw):
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
    prep = "keep" if strategy == "gem" and not (model.startswith("beit") and source == "timm") else "crop"
    recipe = make_recipe(model, strategy, prep, source=source, arch=arch)
    backbone = load_backbone(recipe)
    d = backbone.embed_dim
    expected = {"simple": d, "mean": d, "gem": 2 * d,
                "complex": 4 * d if d < 768 else 2 * d}[strategy]
    feats = compute_features(backbone, _batch(recipe, 2), recipe)
    assert feats.shape == (2, expected)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5)


def test_complex_is_the_concatenation_of_intermediate_tokens(tiny_weights):
    recipe = _recipe(tiny_weights, strategy="complex")
    assert (recipe.n_last_blocks, recipe.avgpool) == (4, False)  # ViT-S: DINO eval_linear defaults
    backbone = load_backbone(recipe, tiny_weights)
    x = _batch(recipe)
    tokens = backbone(x, 4)
    by_hand = torch.cat([tokens[i][0] for i in range(4)], dim=-1)
    assert torch.allclose(compute_features(backbone, x, recipe), torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-5)
    # with avgpool: the final CLS tokens plus the mean of the final patch tokens
    pooled = make_recipe("dino_vits16", "complex", weights=tiny_weights, arch=TINY_ARCH, n_last_blocks=2, avgpool=True)
    by_hand = torch.cat([tokens[2][0], tokens[3][0], tokens[3][1].mean(1)], dim=-1)
    assert torch.allclose(compute_features(backbone, x, pooled), torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-5)


def test_timm_tokens_match_timm_forward_features(tiny_weights):
    backbone = create_model("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)
    x = torch.randn(2, 3, 224, 224)
    cls, patches = backbone(x, 1)[-1]
    assert torch.allclose(torch.cat([cls[:, None], patches], 1), backbone.model.forward_features(x), atol=1e-5)


def test_multiscale_batch_of_one_equals_batch_of_eight(tiny_weights):
    recipe = _recipe(tiny_weights, multiscale=True)
    backbone = load_backbone(recipe, tiny_weights)
    x = _batch(recipe, 8)
    together = compute_features(backbone, x, recipe)
    alone = torch.cat([compute_features(backbone, x[i:i + 1], recipe) for i in range(8)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together, compute_features(backbone, x, _recipe(tiny_weights)), atol=1e-3)


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
    assert len(tokens) == 2 and tokens[-1][0].shape == (1, 48) and tokens[-1][1].shape == (1, 196, 48)


def test_weights_identity_is_hashed_once_but_follows_a_changed_file(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"a" * 1000)
    first = backbones_mod.weights_identity(path)
    reads = []
    monkeypatch.setattr(backbones_mod, "file_digest", lambda f, h: reads.append(f) or h.update(f.read_bytes()))
    assert backbones_mod.weights_identity(path) == first and reads == []  # same file: not read again
    path.write_bytes(b"b" * 1000)  # same size, new content and modification time
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert backbones_mod.weights_identity(path) != first and reads == [path.resolve()]
    link = tmp_path / "model.safetensors"  # as in a Hugging Face snapshot: a link to a blob named by its hash
    link.symlink_to(path)
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert backbones_mod.weights_identity(link) == backbones_mod.weights_identity(copy)  # the name given is hashed


def test_cpu_batch_size_follows_the_token_count():
    assert default_batch_size(make_recipe("dino_vits16"), "cpu") == 20  # 197 tokens
    assert default_batch_size(make_recipe("dino_vits8"), "cpu") == 5  # 785 tokens
    keep = make_recipe("dino_vitb16", preprocess="keep")
    assert keep.tokens() == 21 * 14 + 1 and default_batch_size(keep, "cpu") == 13


def test_plain_attention_on_cpu_computes_what_the_fused_kernel_does(tiny_weights):
    recipe = _recipe(tiny_weights)  # float32: exact agreement; bf16 would differ by its rounding
    backbone = load_backbone(recipe, tiny_weights, "cpu")
    assert not any(block.attn.fused_attn for block in backbone.model.blocks)  # the faster one on CPU
    x = _batch(recipe, 4)
    plain = compute_features(backbone, x, recipe)
    backbone.set_fused_attention(True)
    assert all(block.attn.fused_attn for block in backbone.model.blocks)
    torch.testing.assert_close(compute_features(backbone, x, recipe), plain, atol=1e-5, rtol=1e-5)
