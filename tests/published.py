"""Tiny random-weight checkpoints in each source's PUBLISHED layout, and reference forwards in plain torch.

The checkpoints are saved the way the weights are published, never the way our loader wants them, so tests
that load them check the conversion a real user's download goes through:

- DINO: ``dino_vitbase16_pretrain.pth`` (a plain state dict of ``vision_transformer.VisionTransformer``), the
  training ``checkpoint.pth`` that ``main_dino.py`` writes (``student``/``teacher`` MultiCropWrapper state dicts),
  and the published ``dino_vitbase16_pretrain_full_checkpoint.pth``, which adds the optimizer and the command
  line (``args``, an ``argparse.Namespace``).
- DINOv2: ``dinov2_vits14_pretrain.pth`` (``DinoVisionTransformer`` built by ``dinov2/hub/backbones.py``:
  ``block_chunks=0``, layer scale, a 518-px 37x37 position grid, ``mask_token``, ``register_tokens``).
- BEiT: Hugging Face folders as ``microsoft/beit-*-patch16-224-pt22k`` (``BeitForMaskedImageModeling``) and
  ``-pt22k-ft22k`` (``BeitForImageClassification``) publish them: legacy key names, the published config fields.

``reference_vit_tokens`` recomputes each model from a state dict with nothing but torch operations, following
the original code (DINO/DINOv2 ``vision_transformer.py``, HF ``modeling_beit.py``), so library outputs can be
compared with it. ``tests/test_published.py`` proves it against timm and transformers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

DINOV2_GRID = 37  # DINOv2 is published with img_size=518: 37x37 patches of 14 px


# ------------------------------------------------------------------------------------------ random weights

def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Weights large enough that every part matters (a wrong position embedding, layer scale or head split
    changes the output visibly), small enough that 2-4 blocks stay numerically tame."""
    def normal(std, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("gamma", "lambda_1", "lambda_2"):  # layer scale: distinct per channel
        return torch.rand(shape, generator=gen) * 0.9 + 0.1
    if "norm" in name:
        return normal(0.1, 1.0) if leaf == "weight" else normal(0.1)
    if leaf == "bias":
        return normal(0.1)
    if leaf == "weight":  # linear/conv: unit gain
        return normal(1 / math.sqrt(math.prod(shape[1:])))
    return normal(1.0)  # tokens, position embeddings, relative position bias tables


def _vit_shapes(arch: dict, pos_grid: int, blocks_prefix: str = "blocks") -> dict[str, tuple[int, ...]]:
    """Parameter shapes of DINO's / DINOv2's ViT (timm's original naming), without layer scale or extra tokens."""
    d, p = arch["embed_dim"], arch["patch_size"]
    hidden = int(d * arch.get("mlp_ratio", 4))
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + pos_grid * pos_grid, d),
              "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)}
    for i in range(arch["depth"]):
        b = f"{blocks_prefix}.{i}."
        shapes.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,),
        })
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    return shapes


def _fill(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: _random(k, s, gen) for k, s in shapes.items()}


# ------------------------------------------------------------------------------------------ DINO

def dino_original_state_dict(arch: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """DINO's ``VisionTransformer`` keys (``qkv_bias=True``, head = Identity): pos_embed for 224 px."""
    return _fill(_vit_shapes(arch, 224 // arch["patch_size"]), seed)


def save_dino_original(path: str | Path, arch: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """As ``dino_vitbase16_pretrain.pth``: a plain state dict. Returns it."""
    state = dino_original_state_dict(arch, seed)
    torch.save(state, path)
    return state


def _dino_head(d: int, out_dim: int, hidden: int, bottleneck: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """DINOHead(nlayers=3): mlp = Linear, GELU, Linear, GELU, Linear; last_layer = weight_norm(Linear, no bias)."""
    shapes = {"mlp.0.weight": (hidden, d), "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden),
              "mlp.2.bias": (hidden,), "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
              "last_layer.weight_v": (out_dim, bottleneck)}
    head = {k: _random(k, s, gen) for k, s in shapes.items()}
    head["last_layer.weight_g"] = torch.ones(out_dim, 1)  # norm_last_layer: fixed at 1
    return head


def save_dino_training_checkpoint(path: str | Path, arch: dict, seed: int = 0, out_dim: int = 64) -> dict[str, torch.Tensor]:
    """As ``main_dino.py`` saves ``checkpoint.pth``: ``student`` is DDP(MultiCropWrapper(backbone, head)) so its
    keys start ``module.backbone.``/``module.head.``; ``teacher`` of a ViT is the bare MultiCropWrapper (main_dino
    wraps it in DDP only when it has batch norms), so ``backbone.``/``head.``. The teacher is the trained model
    (it differs from the student). Only tensors and numbers: ``optimizer``, ``args`` (an argparse.Namespace,
    which weights_only loading refuses) and ``fp16_scaler`` are left out. Returns the teacher's backbone."""
    gen = torch.Generator().manual_seed(seed + 1)
    d = arch["embed_dim"]
    teacher = dino_original_state_dict(arch, seed)
    student = dino_original_state_dict(arch, seed + 2)
    checkpoint = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    **{f"module.head.{k}": v for k, v in _dino_head(d, out_dim, 2 * d, d, gen).items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()},
                    **{f"head.{k}": v for k, v in _dino_head(d, out_dim, 2 * d, d, gen).items()}},
        "epoch": 100,
        "dino_loss": {"center": torch.randn(1, out_dim, generator=gen)},
    }
    torch.save(checkpoint, path)
    return teacher


def save_dino_full_checkpoint(path: str | Path, arch: dict, seed: int = 0, out_dim: int = 64) -> dict[str, torch.Tensor]:
    """As DINO publishes ``dino_vitbase16_pretrain_full_checkpoint.pth``: ``main_dino.py``'s checkpoint with all it
    saves, keys in its order: ``student``, ``teacher``, ``optimizer`` (AdamW's state dict after a step),
    ``epoch``, ``args`` (the run's ``argparse.Namespace``) and ``dino_loss``. Returns the teacher's backbone."""
    teacher = save_dino_training_checkpoint(path, arch, seed, out_dim)
    trained = torch.load(path, weights_only=True)
    params = [torch.nn.Parameter(v.clone()) for k, v in trained["student"].items() if not k.endswith("weight_g")]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    args = argparse.Namespace(arch="vit_base", patch_size=arch.get("patch_size", 16), out_dim=out_dim,
                              norm_last_layer=True, momentum_teacher=0.996, use_bn_in_head=False, warmup_teacher_temp=0.04,
                              teacher_temp=0.07, use_fp16=False, weight_decay=0.04, lr=0.00075, epochs=400,
                              optimizer="adamw", global_crops_scale=(0.25, 1.0), local_crops_number=10,
                              data_path="/path/to/imagenet/train", output_dir=".", seed=0, dist_url="env://")
    full = {"student": trained["student"], "teacher": trained["teacher"], "optimizer": optimizer.state_dict(),
            "epoch": trained["epoch"], "args": args, "dino_loss": trained["dino_loss"]}
    torch.save(full, path)
    return teacher


# ------------------------------------------------------------------------------------------ DINOv2

def dinov2_original_state_dict(arch: dict, registers: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """``DinoVisionTransformer`` keys as in ``dinov2_vits14_pretrain.pth`` / ``dinov2_vits14_reg4_pretrain.pth``."""
    d = arch["embed_dim"]
    shapes = _vit_shapes(arch, DINOV2_GRID)
    for i in range(arch["depth"]):
        shapes[f"blocks.{i}.ls1.gamma"] = shapes[f"blocks.{i}.ls2.gamma"] = (d,)
    shapes["mask_token"] = (1, d)
    if registers:
        shapes["register_tokens"] = (1, registers, d)
    return _fill(shapes, seed)


def save_dinov2_original(path: str | Path, arch: dict, registers: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    state = dinov2_original_state_dict(arch, registers, seed)
    torch.save(state, path)
    return state


# ------------------------------------------------------------------------------------------ BEiT (Hugging Face)

# The fields of the published config.json files (microsoft/beit-base-patch16-224-pt22k and -pt22k-ft22k);
# tests override the sizes. save_pretrained would add every field of today's BeitConfig.
BEIT_PT22K_CONFIG = {
    "architectures": ["BeitForMaskedImageModeling"], "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.1,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 768, "image_size": 224,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12, "layer_scale_init_value": 0.1,
    "model_type": "beit", "num_attention_heads": 12, "num_channels": 3, "num_hidden_layers": 12, "patch_size": 16,
    "torch_dtype": "float32", "use_absolute_position_embeddings": False, "use_mask_token": True,
    "use_mean_pooling": True, "use_relative_position_bias": False, "use_shared_relative_position_bias": True,
    "vocab_size": 8192,
}
BEIT_FT22K_CONFIG = {
    **BEIT_PT22K_CONFIG, "architectures": ["BeitForImageClassification"], "use_mask_token": False,
    "use_relative_position_bias": True, "use_shared_relative_position_bias": False,
}


def _save_beit(folder: str | Path, model_cls_name: str, config_fields: dict, seed: int) -> Path:
    import transformers

    folder = Path(folder)
    config = transformers.BeitConfig(**{k: v for k, v in config_fields.items() if k not in ("architectures", "model_type")})
    model = getattr(transformers, model_cls_name)(config)
    model.save_pretrained(folder)  # writes the legacy (published) key names
    randomise_hf_folder(folder, seed)
    (folder / "config.json").write_text(json.dumps(config_fields, indent=2))
    return folder


def randomise_hf_folder(folder: str | Path, seed: int = 0) -> None:
    """Replace every tensor of a ``save_pretrained`` folder with :func:`_random` values (HF's init leaves
    LayerNorms at 1/0, layer scales equal and position biases at 0: bugs in them would not show)."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    weights = Path(folder) / "model.safetensors"
    state = {k: _random(k, tuple(v.shape), gen) for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})


def save_beit_pt22k_hf(folder: str | Path, config_kwargs: dict | None = None, seed: int = 0) -> Path:
    """As microsoft/beit-*-patch16-224-pt22k: BeitForMaskedImageModeling (``beit.*``, a top-level ``layernorm``
    and ``lm_head``), a shared relative position bias, a mask token."""
    return _save_beit(folder, "BeitForMaskedImageModeling", {**BEIT_PT22K_CONFIG, **(config_kwargs or {})}, seed)


def save_beit_ft_hf(folder: str | Path, config_kwargs: dict | None = None, seed: int = 0, num_labels: int = 5) -> Path:
    """As microsoft/beit-*-patch16-224-pt22k-ft22k: BeitForImageClassification (``beit.*`` with
    ``beit.pooler.layernorm``, ``classifier``), a relative position bias per layer, mean pooling."""
    labels = {"id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
              "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}
    return _save_beit(folder, "BeitForImageClassification", {**BEIT_FT22K_CONFIG, **labels, **(config_kwargs or {})}, seed)


def load_hf_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


# ------------------------------------------------------------------------------------------ reference forwards

def _layer_norm(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps)


def _attention(x, q, k, v, proj_w, proj_b, num_heads, bias=None):
    """Multi-head softmax(QK^T/sqrt(d) + bias)V written out (no fused kernel)."""
    b, n, d = x.shape

    def heads(t):
        return t.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-2, -1) * (d // num_heads) ** -0.5
    if bias is not None:
        scores = scores + bias
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, proj_w, proj_b)


def interpolate_patch_pos(pos: torch.Tensor, grid: tuple[int, int], offset: float, antialias: bool) -> torch.Tensor:
    """DINO/DINOv2 ``interpolate_pos_encoding`` for the patch part ``[1, M*M, D]``: bicubic, with DINO's
    historical ``+offset`` scale factor (``offset=0``: an output size, as DINOv2 with registers and HF do)."""
    m = int(math.sqrt(pos.shape[1]))
    if (m, m) == grid:
        return pos
    img = pos.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    if offset:
        kwargs = {"scale_factor": ((grid[0] + offset) / m, (grid[1] + offset) / m)}
    else:
        kwargs = {"size": grid}
    img = F.interpolate(img, mode="bicubic", antialias=antialias, **kwargs)
    assert tuple(img.shape[-2:]) == grid
    return img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


def _dino_like_tokens(state, images, patch, num_heads, layer_scale, offset, antialias, eps):
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    pos = state["pos_embed"]
    pos = torch.cat((pos[:, :1], interpolate_patch_pos(pos[:, 1:], grid, offset, antialias)), dim=1)
    x = torch.cat((state["cls_token"].expand(len(x), -1, -1), x), dim=1) + pos
    if "register_tokens" in state:  # DINOv2 registers: after CLS, no position embedding
        x = torch.cat((x[:, :1], state["register_tokens"].expand(len(x), -1, -1), x[:, 1:]), dim=1)
    out = []
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        h = _layer_norm(x, state, b + "norm1", eps)
        q, k, v = F.linear(h, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        h = _attention(x, q, k, v, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"], num_heads)
        x = x + (h * state[b + "ls1.gamma"] if layer_scale else h)
        h = _layer_norm(x, state, b + "norm2", eps)
        h = F.linear(F.gelu(F.linear(h, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                     state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        x = x + (h * state[b + "ls2.gamma"] if layer_scale else h)
        out.append(_layer_norm(x, state, "norm", eps))
    return out


def beit_relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """BEiT's index into the bias table for every (query, key) pair of CLS + window tokens; the last three
    table rows are CLS->token, token->CLS and CLS->CLS."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    index_2d = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
    n = (2 * wh - 1) * (2 * ww - 1)
    index = torch.full((wh * ww + 1, wh * ww + 1), n + 1)  # token -> CLS
    index[1:, 1:] = index_2d
    index[0, :] = n  # CLS -> token
    index[0, 0] = n + 2
    return index


def _beit_tokens(state, images, patch, num_heads, final_norm, eps):
    p = "beit."
    x = F.conv2d(images, state[p + "embeddings.patch_embeddings.projection.weight"],
                 state[p + "embeddings.patch_embeddings.projection.bias"], stride=patch)
    grid = tuple(x.shape[-2:])
    x = torch.cat((state[p + "embeddings.cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
    index = beit_relative_position_index(grid)

    def bias(table):
        if table.shape[0] != (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3:
            raise ValueError(f"the relative position table does not fit a {grid} grid (no resizing here)")
        return table[index].permute(2, 0, 1)[None]

    shared = state.get(p + "encoder.relative_position_bias.relative_position_bias_table")
    shared = bias(shared) if shared is not None else None
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(p + "encoder.layer."))
    out = []
    for i in range(depth):
        b = f"{p}encoder.layer.{i}."
        a = b + "attention.attention."
        own = state.get(a + "relative_position_bias.relative_position_bias_table")
        h = _layer_norm(x, state, b + "layernorm_before", eps)
        q = F.linear(h, state[a + "query.weight"], state[a + "query.bias"])
        k = F.linear(h, state[a + "key.weight"])  # BEiT's key has no bias
        v = F.linear(h, state[a + "value.weight"], state[a + "value.bias"])
        h = _attention(x, q, k, v, state[b + "attention.output.dense.weight"], state[b + "attention.output.dense.bias"],
                       num_heads, bias(own) if own is not None else shared)
        x = x + state[b + "lambda_1"] * h
        h = _layer_norm(x, state, b + "layernorm_after", eps)
        h = F.linear(F.gelu(F.linear(h, state[b + "intermediate.dense.weight"], state[b + "intermediate.dense.bias"])),
                     state[b + "output.dense.weight"], state[b + "output.dense.bias"])
        x = x + state[b + "lambda_2"] * h
        out.append(_layer_norm(x, state, final_norm, eps) if final_norm else x)
    return out


LAYOUTS = ("dino", "dinov2", "beit_pt22k", "beit_ft")


@torch.no_grad()
def reference_vit_tokens(state_dict: dict[str, torch.Tensor], images: torch.Tensor, patch: int, num_heads: int,
                         layout: str, interpolate_offset: float | None = None,
                         interpolate_antialias: bool | None = None) -> list[torch.Tensor]:
    """Token sequences ``[B, prefix + patches, D]`` after every block, each through the model's final norm.

    layout ``dino`` / ``dinov2``: original keys; the position grid is resized to the input as the original
    ``interpolate_pos_encoding`` does (DINO, DINOv2: scale factor with a 0.1 offset, no antialias; DINOv2 with
    registers: output size, antialias, as ``dinov2/hub/backbones.py`` builds them); override with
    ``interpolate_offset`` / ``interpolate_antialias`` (``0``/``False`` is Hugging Face's ``Dinov2Model``).
    ``beit_pt22k``: HF keys, final norm = the top-level ``layernorm`` of BeitForMaskedImageModeling;
    ``beit_ft``: HF keys, mean pooling, so no final norm on the tokens (see :func:`reference_beit_pooled`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    images = images.float()
    if layout in ("dino", "dinov2"):
        registers = "register_tokens" in state_dict
        offset = interpolate_offset if interpolate_offset is not None else (0.0 if registers else 0.1)
        antialias = interpolate_antialias if interpolate_antialias is not None else registers
        return _dino_like_tokens(state_dict, images, patch, num_heads, layout == "dinov2", offset, antialias, 1e-6)
    return _beit_tokens(state_dict, images, patch, num_heads, "layernorm" if layout == "beit_pt22k" else None, 1e-12)


def reference_beit_pooled(state_dict: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """BeitPooler with mean pooling: ``beit.pooler.layernorm`` of the mean patch token."""
    return _layer_norm(tokens[:, 1:].mean(dim=1), state_dict, "beit.pooler.layernorm", 1e-12)
