"""The published-layout fixtures hold the published keys, and the plain-torch reference forwards of
``tests/published.py`` agree with the libraries that implement each model (timm, transformers)."""

from __future__ import annotations

import pytest
import torch

from published import (
    dinov2_original_state_dict, load_hf_state_dict, randomise_hf_folder, reference_beit_pooled, reference_vit_tokens, save_beit_ft_hf,
    save_beit_pt22k_hf, save_dino_original, save_dino_training_checkpoint,
)

DINO_ARCH = {"embed_dim": 48, "depth": 2, "patch_size": 16}
DINOV2_ARCH = {"embed_dim": 48, "depth": 2, "patch_size": 14}
BEIT_SIZES = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 192,
              "vocab_size": 64}
HEADS = 3


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


def _assert_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _timm_tokens(model, images) -> list[torch.Tensor]:
    """Every block's output through the final norm, from timm's own modules."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    out = []
    for blk in model.blocks:
        x = blk(x)
        out.append(model.norm(x))
    return out


def _timm_from_state_dict(name: str, state: dict, img_size: int, arch: dict):
    """timm's model loaded the way downloaded weights are: through its checkpoint filter."""
    import timm

    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(state)), num_classes=0, img_size=img_size,
        embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=HEADS,
    ).eval()


def test_dino_original_layout_and_reference(tmp_path):
    state = save_dino_original(tmp_path / "dino.pth", DINO_ARCH)
    loaded = torch.load(tmp_path / "dino.pth", weights_only=True)
    assert set(loaded) == set(state)
    assert loaded["pos_embed"].shape == (1, 1 + 14 * 14, 48)
    assert {"cls_token", "patch_embed.proj.weight", "blocks.1.attn.qkv.bias", "blocks.1.mlp.fc2.weight", "norm.bias"} <= set(loaded)
    model = _timm_from_state_dict("vit_small_patch16_224.dino", state, 224, DINO_ARCH)
    images = _images(224)
    with torch.no_grad():
        _assert_close(reference_vit_tokens(state, images, 16, HEADS, "dino"), _timm_tokens(model, images))


def test_dino_training_checkpoint_layout(tmp_path):
    teacher = save_dino_training_checkpoint(tmp_path / "checkpoint.pth", DINO_ARCH)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)  # no pickled objects
    assert ckpt["epoch"] == 100 and set(ckpt) == {"student", "teacher", "epoch", "dino_loss"}
    assert {k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}.keys() == teacher.keys()
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ckpt["student"])
    assert {"head.mlp.0.weight", "head.mlp.4.bias", "head.last_layer.weight_g", "head.last_layer.weight_v"} <= set(ckpt["teacher"])
    # the student is another network: a loader that took it would give other features
    assert not torch.equal(ckpt["student"]["module.backbone.blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("registers, timm_name", [(0, "vit_small_patch14_dinov2"), (4, "vit_small_patch14_reg4_dinov2")])
def test_dinov2_original_layout_and_reference(registers, timm_name):
    """At 518 px (the published grid) timm and the original agree without any resizing of the position grid."""
    state = dinov2_original_state_dict(DINOV2_ARCH, registers)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 48)
    assert state["mask_token"].shape == (1, 48)
    assert ("register_tokens" in state) == bool(registers)
    assert {"blocks.0.ls1.gamma", "blocks.1.ls2.gamma", "blocks.1.attn.qkv.weight"} <= set(state)
    model = _timm_from_state_dict(timm_name, state, 518, DINOV2_ARCH)
    images = _images(518, 1)
    with torch.no_grad():
        _assert_close(reference_vit_tokens(state, images, 14, HEADS, "dinov2"), _timm_tokens(model, images))


def test_dinov2_reference_resized_grid_matches_transformers(tmp_path):
    """At 224 px the 37x37 grid is resized; with an output size and no antialias (``interpolate_offset=0``)
    that is Hugging Face's Dinov2Model, whose legacy keys ``hf_to_original`` maps (as for the ONNX weights)."""
    from onnx_dinov2 import hf_to_original
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=HEADS, image_size=518, patch_size=14)
    Dinov2Model(config).save_pretrained(tmp_path)
    randomise_hf_folder(tmp_path, seed=7)
    model = Dinov2Model.from_pretrained(tmp_path).eval()
    state = hf_to_original(load_hf_state_dict(tmp_path))
    images = _images(224)
    with torch.no_grad():
        hidden = model(pixel_values=images, output_hidden_states=True).hidden_states[1:]
        theirs = [model.layernorm(h) for h in hidden]
        ours = reference_vit_tokens(state, images, 14, HEADS, "dinov2", interpolate_offset=0, interpolate_antialias=False)
    _assert_close(ours, theirs)
    # DINOv2's own resizing (scale factor with a 0.1 offset) places the grid differently
    original = reference_vit_tokens(state, images, 14, HEADS, "dinov2")
    assert not torch.allclose(original[-1], theirs[-1], atol=1e-3)


def test_beit_pt22k_layout_and_reference(tmp_path):
    from transformers import BeitForMaskedImageModeling

    save_beit_pt22k_hf(tmp_path, BEIT_SIZES)
    state = load_hf_state_dict(tmp_path)
    assert {"beit.embeddings.mask_token", "beit.encoder.relative_position_bias.relative_position_bias_table",
            "beit.encoder.layer.1.attention.attention.query.weight", "beit.encoder.layer.1.lambda_2",
            "layernorm.weight", "lm_head.weight"} <= set(state)
    assert not any("pooler" in k for k in state)
    model = BeitForMaskedImageModeling.from_pretrained(tmp_path).eval()
    images = _images(224)
    with torch.no_grad():
        hidden = model.beit(pixel_values=images, output_hidden_states=True).hidden_states[1:]
        _assert_close(reference_vit_tokens(state, images, 16, HEADS, "beit_pt22k"), [model.layernorm(h) for h in hidden])


def test_beit_ft_layout_and_reference(tmp_path):
    from transformers import BeitModel

    save_beit_ft_hf(tmp_path, BEIT_SIZES)
    state = load_hf_state_dict(tmp_path)
    assert {"beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table",
            "beit.pooler.layernorm.weight", "classifier.weight"} <= set(state)
    assert "beit.embeddings.mask_token" not in state
    model = BeitModel.from_pretrained(tmp_path).eval()
    images = _images(224)
    with torch.no_grad():
        out = model(pixel_values=images, output_hidden_states=True)
        ours = reference_vit_tokens(state, images, 16, HEADS, "beit_ft")
    _assert_close(ours, list(out.hidden_states[1:]))
    torch.testing.assert_close(reference_beit_pooled(state, ours[-1]), out.pooler_output, rtol=1e-4, atol=1e-4)
