"""Backbones: a registry of named self-supervised vision transformers behind one interface.

Every backbone returns the CLS token and the patch tokens of its last ``n`` blocks, with the token norm its
checkpoint was trained with, whatever its source (timm, torch.hub, Hugging Face), so every pooling works with
every model. Each registry entry carries its own preprocessing defaults (mean, std, interpolation, input size).
"""

from __future__ import annotations

import copy

import argparse
import contextlib
import functools
import hashlib
import logging
import math
import os
import socket
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BannermatchError
from .files import file_digest

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BEIT_MEAN = BEIT_STD = (0.5, 0.5, 0.5)

SOURCES = ("timm", "hub", "hf")


@dataclass(frozen=True)
class ModelSpec:
    """A named backbone: where its weights live and how its inputs are prepared."""

    name: str
    family: str  # dino, dinov2, beit
    embed_dim: int
    patch_size: int
    timm_name: str | None = None
    hub: tuple[str, str] | None = None  # (repo, entry point) for torch.hub.load
    hf_name: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    input_size: int = 224
    description: str = ""

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for s, v in zip(SOURCES, (self.timm_name, self.hub, self.hf_name)) if v)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _dino(name: str, size: str, patch: int, dim: int) -> None:
    register_model(ModelSpec(
        name, "dino", dim, patch, timm_name=f"vit_{size}_patch{patch}_224.dino",
        hub=("facebookresearch/dino:main", name), description=f"DINO ViT-{size[0].upper()}/{patch}",
    ))


def _dinov2(name: str, size: str, dim: int, registers: bool) -> None:
    reg = "_reg4" if registers else ""
    register_model(ModelSpec(
        name + ("_reg4" if registers else ""), "dinov2", dim, 14, timm_name=f"vit_{size}_patch14{reg}_dinov2.lvd142m",
        # ":main" names the cached checkout; without a ref torch.hub asks GitHub for the default branch
        hub=("facebookresearch/dinov2:main", name + ("_reg" if registers else "")),
        description=f"DINOv2 ViT-{size[0].upper()}/14" + (" with 4 registers" if registers else ""),
    ))


def _beit(name: str, dim: int, timm_tag: str | None, hf_name: str, description: str) -> None:
    size = "base" if dim == 768 else "large"
    register_model(ModelSpec(
        name, "beit", dim, 16, timm_name=f"beit_{size}_patch16_224.{timm_tag}" if timm_tag else None,
        hf_name=hf_name, mean=BEIT_MEAN, std=BEIT_STD, description=description,
    ))


for _n, _s, _p, _d in [("dino_vits16", "small", 16, 384), ("dino_vits8", "small", 8, 384),
                       ("dino_vitb16", "base", 16, 768), ("dino_vitb8", "base", 8, 768)]:
    _dino(_n, _s, _p, _d)
for _n, _s, _d in [("dinov2_vits14", "small", 384), ("dinov2_vitb14", "base", 768), ("dinov2_vitl14", "large", 1024)]:
    for _reg in (False, True):
        _dinov2(_n, _s, _d, _reg)
for _size, _d in [("base", 768), ("large", 1024)]:
    _beit(f"beit_{_size}_pt22k", _d, None, f"microsoft/beit-{_size}-patch16-224-pt22k",
          f"BEiT-{_size[0].upper()}/16, self-supervised on ImageNet-22k (no labels)")
    _beit(f"beit_{_size}_pt22k_ft22k", _d, "in22k_ft_in22k", f"microsoft/beit-{_size}-patch16-224-pt22k-ft22k",
          f"BEiT-{_size[0].upper()}/16, fine-tuned on ImageNet-22k")
    _beit(f"beit_{_size}_pt22k_ft22k_ft1k", _d, "in22k_ft_in22k_in1k", f"microsoft/beit-{_size}-patch16-224",
          f"BEiT-{_size[0].upper()}/16, fine-tuned on ImageNet-22k then 1k")


def list_models() -> list[ModelSpec]:
    return list(_REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BannermatchError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def default_source(spec: ModelSpec) -> str:
    return spec.sources[0]


# ------------------------------------------------------------------------------------------ weights

def weights_identity(path: str | Path | None) -> str | None:
    """A content hash of a local weights file, so a recipe names exactly which weights made its features."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():  # a Hugging Face model folder
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    elif path.is_file():
        files = [path]
    else:
        raise BannermatchError(f"weights not found: {path}")
    stats = [(f, f.stat()) for f in files]
    return _content_identity(tuple((f.name, str(f.resolve()), st.st_size, st.st_mtime_ns) for f, st in stats))


@functools.lru_cache(maxsize=64)
def _content_identity(files: tuple[tuple[str, str, int, int], ...]) -> str:
    """Keyed by path, size and modification time: each weights file is read once per process, not once per
    recipe and again per model load. The name hashed is the one given (a
    Hugging Face snapshot links to blobs named by their hash)."""
    h = hashlib.sha256()
    for name, resolved, _, _ in files:
        h.update(name.encode())
        file_digest(Path(resolved), h)
    return "sha256:" + h.hexdigest()[:16]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or ``torch.load(weights_only=True)``, which refuses pickled code."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # DINO's full training checkpoints keep their command line as an argparse.Namespace under "args":
            # that one class is let through, for this load only (torch < 2.5 has no safe_globals: refused there)
            allow = getattr(torch.serialization, "safe_globals", lambda _: contextlib.nullcontext())
            with allow([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BannermatchError(f"weights not found: {path}") from None
    except Exception as exc:  # unpickling errors come in many types; all mean "not a plain tensor file"
        raise BannermatchError(
            f"refusing to load {path}: not a plain state dict or safetensors file ({type(exc).__name__})"
        ) from None
    for key in ("state_dict", "model", "teacher"):  # common checkpoint wrappers (DINO saves "teacher")
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BannermatchError(f"{path} does not hold a state dict of tensors")
    # DINO training checkpoints prefix their keys with "module." and "backbone.", and carry the projection
    # head ("head.*"), which is not part of the backbone
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


# ------------------------------------------------------------------------------------------ backbones

class Backbone(nn.Module):
    """One interface over every source: ``forward(x, n_last)`` -> ``[(cls, patches), ...]`` for the last
    ``n_last`` blocks, oldest first, with the model's token norm applied.

    Each backbone declares its token layout: how many prefix tokens (CLS, registers) come before the patches
    (only the CLS is kept; registers are never pooled), the norm its checkpoint trained for every token
    (DINO's ``norm``, BEiT-pt22k's top-level ``layernorm``; none for mean-pooling BEiT) and the norm of the
    mean-pooled patch token (:attr:`pool_norm`: BEiT's trained ``fc_norm``/``pooler.layernorm``, else none).
    """

    dynamic_size = True  # accepts inputs of any size that is a multiple of the patch size
    dtype = torch.float32  # the working precision of the weights: see in_precision

    def __init__(self, spec: ModelSpec, model: nn.Module, embed_dim: int, depth: int, num_prefix_tokens: int,
                 pool_norm: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_prefix_tokens = num_prefix_tokens
        self.pool_norm: nn.Module = pool_norm if pool_norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor, n_last: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def in_precision(self, dtype: torch.dtype) -> Backbone:
        """The weights in ``dtype``, the precision the model computes in: no autocast, so no casts around every
        operation (bf16 weights ran 1.07-1.35x autocast over fp32 weights on an AMX CPU; BENCHMARKS.md run 8). The
        pooling norm is a float32 copy: the pooled components are accumulated in float32, as under autocast. A copy,
        since it can be a module of the model itself (HF BEiT's pooler), which must stay in the model's precision:
        CUDA's LayerNorm refuses half inputs with float32 weights."""
        self.to(dtype)
        self.pool_norm = copy.deepcopy(self.pool_norm).float()
        self.dtype = dtype
        return self

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS, patch tokens) of a full token sequence ``[B, prefix + patches, D]``."""
        return tokens[:, 0], tokens[:, self.num_prefix_tokens:]

    def set_fused_attention(self, enabled: bool) -> None:
        """timm blocks: PyTorch's fused attention (``scaled_dot_product_attention``) or the plain softmax(QK^T)V.
        The torch.hub and Hugging Face models keep their own choice."""
        for block in getattr(self.model, "blocks", ()):
            if hasattr(getattr(block, "attn", None), "fused_attn"):
                block.attn.fused_attn = enabled


class TimmBackbone(Backbone):
    """timm ViT (DINO, DINOv2 with or without registers) and BEiT, through timm's own ``forward_intermediates``."""

    def forward(self, x, n_last=1):
        layers = self.model.forward_intermediates(x, indices=n_last, norm=True, output_fmt="NLC",
                                                  intermediates_only=True, return_prefix_tokens=True)
        return [(prefix[:, 0], patches) for patches, prefix in layers]


class HubDino(Backbone):
    """DINO / DINOv2 as published on torch.hub, through their own ``get_intermediate_layers``."""

    def forward(self, x, n_last=1):
        if self.spec.family == "dinov2":  # patch tokens without CLS and registers, and the CLS apart
            layers = self.model.get_intermediate_layers(x, n_last, return_class_token=True, norm=True)
            return [(cls, patches) for patches, cls in layers]
        return [self.split(t) for t in self.model.get_intermediate_layers(x, n_last)]


class HFBeit(Backbone):
    """``transformers`` BEiT: hidden states (before any norm) through the checkpoint's own token norm."""

    def __init__(self, spec, model, embed_dim, depth, num_prefix_tokens, pool_norm, token_norm: nn.Module):
        super().__init__(spec, model, embed_dim, depth, num_prefix_tokens, pool_norm)
        self.token_norm = token_norm

    def forward(self, x, n_last=1):
        out = self.model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
        return [self.split(self.token_norm(h)) for h in out.hidden_states[-n_last:]]


def _require_host(host: str, cached: bool) -> None:
    """Fail at once, in one line, when published weights are not cached and their host cannot be reached
    (the download libraries would otherwise retry for about a minute)."""
    if cached or os.environ.get("HF_HUB_OFFLINE"):
        return
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        raise BannermatchError(f"cannot reach {host} to download the model weights ({exc.__class__.__name__}); "
                               "offline, pass --weights PATH (a local .pth/.safetensors, or a HF model folder)") from None


def _in_hf_cache(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _create_timm(spec, weights, arch) -> Backbone:
    import timm

    # No img_size: position embeddings stay at the size they were trained at (DINOv2: 37x37 for 518 px) and are
    # interpolated once, at each input's size, as Meta's code does; BEiT's relative position tables are fixed.
    kwargs = dict(num_classes=0, **(arch or {}))
    if spec.family != "beit":
        kwargs["dynamic_img_size"] = True
    if weights is not None:
        if Path(weights).is_dir():
            raise BannermatchError(f"{weights} is a folder; timm weights are one .pth/.safetensors file")
        # The same path as downloaded weights, so timm's checkpoint filter adapts them (DINOv2's keys, registers).
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=load_state_dict(weights)))
    else:
        kwargs["pretrained"] = not arch  # an architecture override has no published weights
        if kwargs["pretrained"]:
            _require_host("huggingface.co", _in_hf_cache(f"timm/{spec.timm_name}", ("model.safetensors", "pytorch_model.bin")))
    if kwargs["pretrained"] and spec.family != "beit":
        kwargs["weight_init"] = "skip"  # every weight is loaded next; timm's initialisation would be thrown away
    try:
        model = timm.create_model(spec.timm_name, **kwargs)
    except RuntimeError as exc:
        raise BannermatchError(f"weights do not fit {spec.name}: {str(exc).splitlines()[0]}") from None
    if spec.family != "beit":
        registers = getattr(model, "reg_token", None) is not None
        # DINOv2 with registers resizes to the grid with antialiasing; DINO and DINOv2 by a scale factor with their
        # historical 0.1 offset, without (dinov2/hub/backbones.py, dino/vision_transformer.py)
        model.pos_offset, model.pos_antialias = (0.0, True) if registers else (0.1, False)
        model._pos_embed = types.MethodType(_meta_pos_embed, model)
    backbone = TimmBackbone(spec, model, model.embed_dim, len(model.blocks), model.num_prefix_tokens,
                            getattr(model, "fc_norm", None))
    backbone.dynamic_size = spec.family != "beit"
    return backbone


def _meta_pos_embed(model, x: torch.Tensor) -> torch.Tensor:
    """timm's ``VisionTransformer._pos_embed`` (dynamic size, NHWC patches) with the position grid resized as Meta's
    ``interpolate_pos_encoding`` does, from the grid the weights were trained at, so timm's features equal the
    originals' at every input size (timm resizes to the size, with antialiasing)."""
    batch, height, width, dim = x.shape
    kept = 0 if model.no_embed_class else model.num_prefix_tokens  # prefix positions held by pos_embed
    pos = model.pos_embed
    grid = pos[:, kept:]
    side = math.isqrt(grid.shape[1])
    if (height, width) != (side, side):
        offset = model.pos_offset
        resize = (dict(scale_factor=((height + offset) / side, (width + offset) / side)) if offset
                  else dict(size=(height, width)))
        grid = F.interpolate(grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic",
                             antialias=model.pos_antialias, **resize).permute(0, 2, 3, 1).reshape(1, height * width, dim)
        pos = torch.cat([pos[:, :kept], grid.to(pos.dtype)], dim=1)
    x = x.reshape(batch, height * width, dim)
    prefix = [model.cls_token.expand(batch, -1, -1)]
    if model.reg_token is not None:
        prefix.append(model.reg_token.expand(batch, -1, -1))
    x = torch.cat(prefix + [x + pos], dim=1) if model.no_embed_class else torch.cat(prefix + [x], dim=1) + pos
    return model.pos_drop(x)


def hub_checkout(repo: str) -> Path:
    """Where torch.hub keeps a GitHub checkout of ``owner/name:ref``."""
    owner, name_ref = repo.split("/")
    return Path(torch.hub.get_dir()) / f"{owner}_{name_ref.replace(':', '_')}"


def _create_hub(spec, weights, arch) -> Backbone:
    repo, entry = spec.hub
    source = "local" if Path(repo).is_dir() else "github"
    if source == "github":
        _require_host("github.com", hub_checkout(repo).is_dir())
    model = torch.hub.load(repo, entry, source=source, pretrained=weights is None, trust_repo=True, **(arch or {}))
    if weights is not None:
        missing, _ = model.load_state_dict(load_state_dict(weights), strict=False)
        if missing:
            raise BannermatchError(f"weights do not fit {spec.name}: missing {', '.join(missing[:3])}")
    prefix = 1 + getattr(model, "num_register_tokens", 0)
    return HubDino(spec, model, model.embed_dim, len(model.blocks), prefix)


def _create_hf(spec, weights, arch) -> Backbone:
    try:
        from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, BeitModel
    except ImportError:
        raise BannermatchError("Hugging Face models need: pip install 'bannermatch[hf]'") from None
    where = str(weights) if weights is not None else spec.hf_name
    if arch:
        model = BeitModel(BeitConfig(**arch))
    else:
        if weights is None:
            _require_host("huggingface.co", _in_hf_cache(spec.hf_name, ("config.json",)))
        # The class the checkpoint was published as, so every trained weight is loaded: pt22k is a masked image
        # model whose trained final norm is its top-level `layernorm` (BeitModel would drop it, and make a fresh,
        # untrained pooler); the fine-tuned ones are classifiers whose pooler norm is trained.
        architecture = (BeitConfig.from_pretrained(where).architectures or ["BeitModel"])[0]
        cls = {"BeitForMaskedImageModeling": BeitForMaskedImageModeling,
               "BeitForImageClassification": BeitForImageClassification}.get(architecture, BeitModel)
        model = cls.from_pretrained(where, attn_implementation="sdpa")
    beit = model if isinstance(model, BeitModel) else model.beit
    token_norm = beit.layernorm  # identity when the model mean-pools
    if isinstance(model, BeitForMaskedImageModeling):
        token_norm = nn.Sequential(token_norm, model.layernorm)
    pooler_norm = getattr(getattr(beit, "pooler", None), "layernorm", None)
    return HFBeit(spec, beit, beit.config.hidden_size, beit.config.num_hidden_layers, 1, pooler_norm, token_norm)


_CREATORS = {"timm": _create_timm, "hub": _create_hub, "hf": _create_hf}


def create_model(
    name: str,
    source: str | None = None,
    weights: str | Path | None = None,
    arch: dict | None = None,
) -> Backbone:
    """Build a registered backbone in eval mode.

    ``source`` is ``timm``, ``hub`` or ``hf`` (default: the first the model has). ``weights`` is a local
    state dict / safetensors file (or a Hugging Face model folder) used instead of downloading.
    ``arch`` overrides architecture arguments (e.g. ``depth``), for small test models.
    """
    spec = get_spec(name)
    source = source or default_source(spec)
    if source not in spec.sources:
        raise BannermatchError(f"{name} is not available from {source!r}; sources: {', '.join(spec.sources)}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # models without published weights (arch overrides) are reproducible
            backbone = _CREATORS[source](spec, weights, arch)
    except BannermatchError:
        raise
    except OSError as exc:
        if weights is None:
            raise BannermatchError(
                f"cannot download {name} weights ({type(exc).__name__}); offline, pass --weights PATH"
            ) from None
        raise BannermatchError(f"cannot load weights for {name}: {exc}") from None
    return backbone.eval().requires_grad_(False)
