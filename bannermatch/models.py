"""Models: a registry of named self-supervised backbones behind one interface.

Every backbone returns the normed token sequences ``[B, prefix + patches, D]`` of its last ``n`` blocks,
whatever its source (timm, torch.hub, Hugging Face), so every feature strategy works with every model.
Each registry entry carries its own preprocessing defaults (mean, std, interpolation, input size).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
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


def _dinov2(name: str, size: str, dim: int) -> None:
    register_model(ModelSpec(
        name, "dinov2", dim, 14, timm_name=f"vit_{size}_patch14_dinov2.lvd142m",
        hub=("facebookresearch/dinov2", name), description=f"DINOv2 ViT-{size[0].upper()}/14",
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
    _dinov2(_n, _s, _d)
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
    # DINO training checkpoints prefix their keys with "module." and "backbone."
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


# ------------------------------------------------------------------------------------------ backbones

class Backbone(nn.Module):
    """``forward(x, n_last)`` -> the normed token sequences of the last ``n_last`` blocks, oldest first."""

    num_prefix_tokens = 1
    dynamic_size = True  # accepts inputs of any size that is a multiple of the patch size

    def __init__(self, spec: ModelSpec, model: nn.Module, embed_dim: int, depth: int):
        super().__init__()
        self.spec = spec
        self.model = model
        self.embed_dim = embed_dim
        self.depth = depth
        #: applied to mean-pooled patch tokens: BEiT's own pooling norm, identity for DINO.
        self.pool_norm: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor, n_last: int = 1) -> list[torch.Tensor]:
        raise NotImplementedError

    def set_fused_attention(self, enabled: bool) -> None:
        """timm blocks: PyTorch's fused attention (``scaled_dot_product_attention``) or the plain softmax(QK^T)V.
        The torch.hub and Hugging Face models keep their own choice."""
        for block in getattr(self.model, "blocks", ()):
            if hasattr(getattr(block, "attn", None), "fused_attn"):
                block.attn.fused_attn = enabled


class TimmViT(Backbone):
    """timm VisionTransformer (DINO, DINOv2): explicit block loop, as DINO's get_intermediate_layers."""

    def forward(self, x, n_last=1):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        out = []
        for i, blk in enumerate(m.blocks):
            x = blk(x)
            if i >= len(m.blocks) - n_last:
                out.append(m.norm(x))
        return out


class TimmBeit(Backbone):
    dynamic_size = False  # relative position bias tables are built for one input size

    def __init__(self, spec, model, embed_dim, depth):
        super().__init__(spec, model, embed_dim, depth)
        self.pool_norm = model.fc_norm

    def forward(self, x, n_last=1):
        m = self.model
        x = m.patch_embed(x)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        x = m.pos_drop(x)
        rel_pos_bias = m.rel_pos_bias() if m.rel_pos_bias is not None else None
        out = []
        for i, blk in enumerate(m.blocks):
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
            if i >= len(m.blocks) - n_last:
                out.append(m.norm(x))
        return out


class HubDino(Backbone):
    """DINO / DINOv2 as published on torch.hub, through their own ``get_intermediate_layers``."""

    def forward(self, x, n_last=1):
        if self.spec.family == "dinov2":
            layers = self.model.get_intermediate_layers(x, n_last, return_class_token=True, norm=True)
            return [torch.cat((cls[:, None], patches), dim=1) for patches, cls in layers]
        return list(self.model.get_intermediate_layers(x, n_last))


class HFBeit(Backbone):
    """``transformers.BeitModel``: the true CLS token of ``last_hidden_state``, not a head's output."""

    def __init__(self, spec, model, embed_dim, depth):
        super().__init__(spec, model, embed_dim, depth)
        if getattr(model, "pooler", None) is not None:
            self.pool_norm = model.pooler.layernorm

    def forward(self, x, n_last=1):
        out = self.model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
        # hidden_states[-1] is last_hidden_state before the model's final norm (identity when mean-pooling)
        return [self.model.layernorm(h) for h in out.hidden_states[-n_last:]]


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


def _create_timm(spec, weights, arch, img_size) -> Backbone:
    import timm

    kwargs = dict(num_classes=0, img_size=img_size, **(arch or {}))
    cls = TimmBeit if spec.family == "beit" else TimmViT
    if cls is TimmViT:
        kwargs["dynamic_img_size"] = True
    if weights is not None:
        # The same path as downloaded weights, so timm's checkpoint filter adapts them (position embeddings).
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=load_state_dict(weights)))
        if Path(weights).is_dir():
            raise BannermatchError(f"{weights} is a folder; timm weights are one .pth/.safetensors file")
    else:
        kwargs["pretrained"] = not arch  # an architecture override has no published weights
        if kwargs["pretrained"]:
            hf_id = f"timm/{spec.timm_name}"
            _require_host("huggingface.co", _in_hf_cache(hf_id, ("model.safetensors", "pytorch_model.bin")))
    if cls is TimmViT and kwargs["pretrained"]:
        kwargs["weight_init"] = "skip"  # every weight is loaded next; timm's initialisation would be thrown away
    try:
        model = timm.create_model(spec.timm_name, **kwargs)
    except RuntimeError as exc:
        raise BannermatchError(f"weights do not fit {spec.name}: {str(exc).splitlines()[0]}") from None
    return cls(spec, model, model.embed_dim, len(model.blocks))


def _create_hub(spec, weights, arch, img_size) -> Backbone:
    repo, entry = spec.hub
    source = "github"
    if Path(repo).is_dir():
        source = "local"
    if source == "github":
        owner, name_ref = repo.split("/")
        checkout = Path(torch.hub.get_dir()) / f"{owner}_{name_ref.replace(':', '_')}"
        _require_host("github.com", checkout.is_dir())
    model = torch.hub.load(repo, entry, source=source, pretrained=weights is None, trust_repo=True, **(arch or {}))
    if weights is not None:
        missing, unexpected = model.load_state_dict(load_state_dict(weights), strict=False)
        if missing:
            raise BannermatchError(f"weights do not fit {spec.name}: missing {', '.join(missing[:3])}")
    return HubDino(spec, model, model.embed_dim, len(model.blocks))


def _create_hf(spec, weights, arch, img_size) -> Backbone:
    try:
        from transformers import BeitConfig, BeitModel
    except ImportError:
        raise BannermatchError("Hugging Face models need: pip install 'bannermatch[hf]'") from None
    where = str(weights) if weights is not None else spec.hf_name
    if arch:
        model = BeitModel(BeitConfig(**arch))
    else:
        if weights is None:
            _require_host("huggingface.co", _in_hf_cache(spec.hf_name, ("config.json",)))
        model = BeitModel.from_pretrained(where, add_pooling_layer=True, attn_implementation="sdpa")
    return HFBeit(spec, model, model.config.hidden_size, model.config.num_hidden_layers)


_CREATORS = {"timm": _create_timm, "hub": _create_hub, "hf": _create_hf}


def create_model(
    name: str,
    source: str | None = None,
    weights: str | Path | None = None,
    arch: dict | None = None,
    img_size: tuple[int, int] = (224, 224),
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
            backbone = _CREATORS[source](spec, weights, arch, img_size)
    except BannermatchError:
        raise
    except OSError as exc:
        if weights is None:
            raise BannermatchError(
                f"cannot download {name} weights ({type(exc).__name__}); offline, pass --weights PATH"
            ) from None
        raise BannermatchError(f"cannot load weights for {name}: {exc}") from None
    return backbone.eval().requires_grad_(False)
