"""The recipe: the small object that names a feature set (model, weights, preprocessing, strategy) and keys its cache.

A recipe has two parts. The *pass* (model, source, weights, preprocessing, multiscale) decides the forward pass
and so the stored tokens: one pass serves every strategy, and names the store folder (:attr:`Recipe.slug`). The
*view* (strategy, and for ``complex`` its blocks and mean token) is chosen when the features are read.
Precision is not part of either: it changes features at rounding level only, like the batch size, so it is
recorded with the stored features, not keyed on.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .backbones import default_source, get_spec, weights_identity
from .errors import BannermatchError

STRATEGIES = ("simple", "complex", "gem", "mean")
PREPROCESSING = ("crop", "squash", "keep")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)  # DINO's multi-scale evaluation
STORED_BLOCKS = 4  # CLS tokens kept per pass: DINO's linear evaluation uses at most the last 4 blocks
_CPU_BATCH_TOKENS = 4096
_PASS_FIELDS = ("model", "source", "weights", "preprocess", "multiscale", "arch")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a feature vector. Two equal recipes on the same images give the same features.

    Build one with :func:`make_recipe`, which checks the names and fills in defaults.
    """

    model: str = "dino_vitb16"
    strategy: str = "simple"
    preprocess: str = "crop"
    multiscale: bool = False
    source: str = "timm"
    weights: str | None = None  # content hash of local weights; None = the published weights
    n_last_blocks: int = 1  # `complex` only
    avgpool: bool = False  # `complex` only
    arch: tuple[tuple[str, object], ...] = ()  # architecture overrides (small test models)

    def pass_dict(self) -> dict:
        """The fields that decide the forward pass (and so the store folder)."""
        d = self.to_dict()
        return {k: d[k] for k in _PASS_FIELDS}

    @property
    def slug(self) -> str:
        """Folder name of the forward pass's store: readable, plus a hash of every pass field."""
        digest = hashlib.sha256(json.dumps(self.pass_dict(), sort_keys=True).encode()).hexdigest()[:8]
        ms = "-ms" if self.multiscale else ""
        return f"{self.model}.{self.preprocess}{ms}.{self.source}.{digest}"

    @property
    def view(self) -> str:
        """The strategy as read from the stored pass: ``simple``, ``complex-4``, ``complex-1+avg``, ..."""
        if self.strategy != "complex":
            return self.strategy
        return f"complex-{self.n_last_blocks}" + ("+avg" if self.avgpool else "")

    @property
    def label(self) -> str:
        ms = "+multiscale" if self.multiscale else ""
        return f"{self.model} {self.strategy}{ms} {self.preprocess}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["arch"] = dict(self.arch)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["arch"] = tuple(sorted((d.get("arch") or {}).items()))
        return cls(**d)

    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        spec = get_spec(self.model)
        size = spec.input_size
        if self.preprocess == "keep":  # banners are 2:3; round the height to whole patches
            return round(size * 1.5 / spec.patch_size) * spec.patch_size, size
        return size, size

    def tokens(self) -> int:
        """Tokens per image at full scale (patches plus CLS): what a batch costs in memory and cache."""
        height, width = self.input_size()
        patch = get_spec(self.model).patch_size
        return (height // patch) * (width // patch) + 1

    def feature_dim(self, embed_dim: int) -> int:
        return {"simple": embed_dim, "mean": embed_dim, "gem": 2 * embed_dim,
                "complex": embed_dim * (self.n_last_blocks + self.avgpool)}[self.strategy]


def _embed_dim(model: str, arch: dict | None) -> int:
    dims = [v for k, v in (arch or {}).items() if k in ("embed_dim", "hidden_size")]
    return dims[0] if dims else get_spec(model).embed_dim


def make_recipe(
    model: str = "dino_vitb16",
    strategy: str = "simple",
    preprocess: str = "crop",
    multiscale: bool = False,
    source: str | None = None,
    weights: str | Path | None = None,
    n_last_blocks: int | None = None,
    avgpool: bool | None = None,
    arch: dict | None = None,
) -> Recipe:
    """Check the names, fill in defaults (source, `complex` blocks), hash local weights."""
    spec = get_spec(model)
    for value, valid, what in [(strategy, STRATEGIES, "strategy"), (preprocess, PREPROCESSING, "preprocessing")]:
        if value not in valid:
            raise BannermatchError(f"unknown {what} {value!r}; choose one of: {', '.join(valid)}")
    source = source or default_source(spec)
    if source not in spec.sources:
        raise BannermatchError(f"{model} is not available from {source!r}; sources: {', '.join(spec.sources)}")
    if (multiscale or preprocess == "keep") and spec.family == "beit" and source == "timm":
        raise BannermatchError(f"{'multiscale' if multiscale else 'keep'} needs resizable position embeddings: "
                               "timm's BEiT is built for 224x224; use source 'hf'")
    if strategy == "complex":
        # DINO's linear evaluation: ViT-S uses 4 blocks' CLS, ViT-B the final CLS + mean patch token.
        embed_dim = _embed_dim(model, arch)
        n_last_blocks = (4 if embed_dim < 768 else 1) if n_last_blocks is None else n_last_blocks
        avgpool = (embed_dim >= 768) if avgpool is None else avgpool
        if not 1 <= n_last_blocks <= STORED_BLOCKS:
            raise BannermatchError(f"n_last_blocks must be between 1 and {STORED_BLOCKS} (the blocks a pass stores)")
    else:
        n_last_blocks, avgpool = 1, False
    return Recipe(model, strategy, preprocess, multiscale, source, weights_identity(weights), n_last_blocks, bool(avgpool),
                  tuple(sorted((arch or {}).items())))


# ------------------------------------------------------------------------------------------ devices and precision

def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BannermatchError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BannermatchError("CUDA was asked for but no GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """The precision a run's model computes in (its weights cast to it): ``auto`` is the fastest one the hardware
    computes natively."""
    dtype = dtype or "auto"
    if dtype not in DTYPES:
        raise BannermatchError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if gpu_has_bf16(device) else "float16"
    # bf16 pays off on CPUs with native bf16 dot products (AVX512-BF16 / AMX); elsewhere fp32 (BENCHMARKS.md run 7).
    return "bfloat16" if torch.backends.mkldnn.is_available() and cpu_has_bf16() else "float32"


def gpu_has_bf16(device: torch.device) -> bool:
    """Native bf16 tensor cores (Ampere, compute capability 8.0, and newer). ``torch.cuda.is_bf16_supported()``
    also says yes on a T4 (7.5), where bf16 is emulated and slower than fp16."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_batch_size(recipe: Recipe, device: str | torch.device | None = None) -> int:
    """Images per batch: 64 on a GPU; on a CPU, about 4,096 tokens (20 images for ViT-S/16 at 224, 5 for ViT-S/8):
    small batches bound memory and ran within 1% of batch 64 (ViT-S/16, ViT-B/16) or faster (ViT-S/8 1.48x;
    BENCHMARKS.md)."""
    if resolve_device(device).type != "cpu":
        return 64
    return max(1, _CPU_BATCH_TOKENS // recipe.tokens())
