"""Features: the recipe that names a feature set, preprocessing, pooling strategies, and the feature store.

Extraction is batched and streamed (DataLoader workers decode and resize while the model runs), runs
under autocast, and writes float16 ``.npy`` chunks plus a JSON manifest with atomic renames, so an
interrupted run resumes at the first unfinished chunk and an identical recipe recomputes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T

from . import __version__
from .errors import BannermatchError
from .files import atomic_write, file_digest
from .models import Backbone, create_model, default_source, get_spec, weights_identity
from .sources import ImageSource, SkipImage, decode_image, open_source

log = logging.getLogger(__name__)

STRATEGIES = ("simple", "complex", "gem", "mean")
PREPROCESSING = ("crop", "squash", "keep")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)  # DINO's multi-scale evaluation
_CPU_BATCH_TOKENS = 4096
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ recipe

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
    dtype: str = "float32"  # autocast dtype the model ran in
    n_last_blocks: int = 1  # `complex` only
    avgpool: bool = False  # `complex` only
    arch: tuple[tuple[str, object], ...] = ()  # architecture overrides (small test models)

    @property
    def slug(self) -> str:
        """Folder name of the feature set: readable, plus a hash of every field."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        ms = "-ms" if self.multiscale else ""
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]
        return f"{self.model}.{self.strategy}{ms}.{self.preprocess}.{self.source}.{dtype}.{digest}"

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
        d = dict(d)
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


def default_batch_size(recipe: Recipe, device: str | torch.device | None = None) -> int:
    """Images per batch: 64 on a GPU; on a CPU, about 4,096 tokens (20 images for ViT-S/16 at 224, 5 for ViT-S/8):
    small batches bound memory and ran within 1% of batch 64 (ViT-S/16, ViT-B/16) or faster (ViT-S/8 1.48x;
    BENCHMARKS.md)."""
    if resolve_device(device).type != "cpu":
        return 64
    return max(1, _CPU_BATCH_TOKENS // recipe.tokens())


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BannermatchError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BannermatchError("CUDA was asked for but no GPU is available; use --device cpu")
    return dev


def _auto_dtype(device: torch.device) -> str:
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    # bf16 autocast pays off on CPUs with native bf16 dot products (AVX512-BF16 / AMX); elsewhere fp32.
    return "bfloat16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "float32"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_recipe(
    model: str = "dino_vitb16",
    strategy: str = "simple",
    preprocess: str = "crop",
    multiscale: bool = False,
    source: str | None = None,
    weights: str | Path | None = None,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    n_last_blocks: int | None = None,
    avgpool: bool | None = None,
    arch: dict | None = None,
) -> Recipe:
    """Check the names, fill in defaults (source, `complex` blocks, dtype for the device), hash local weights."""
    spec = get_spec(model)
    for value, valid, what in [(strategy, STRATEGIES, "strategy"), (preprocess, PREPROCESSING, "preprocessing"),
                               (dtype, DTYPES, "dtype")]:
        if value not in valid:
            raise BannermatchError(f"unknown {what} {value!r}; choose one of: {', '.join(valid)}")
    source = source or default_source(spec)
    if source not in spec.sources:
        raise BannermatchError(f"{model} is not available from {source!r}; sources: {', '.join(spec.sources)}")
    if dtype == "auto":
        dtype = _auto_dtype(resolve_device(device) if not isinstance(device, torch.device) else device)
    if multiscale and spec.family == "beit" and source == "timm":
        raise BannermatchError("multiscale needs resizable position embeddings: use a DINO model or source 'hf'")
    if strategy == "complex":
        arch_dims = [v for k, v in (arch or {}).items() if k in ("embed_dim", "hidden_size")]
        embed_dim = arch_dims[0] if arch_dims else spec.embed_dim
        # DINO's linear evaluation: ViT-S uses 4 blocks' CLS, ViT-B the final CLS + mean patch token.
        n_last_blocks = n_last_blocks or (4 if embed_dim < 768 else 1)
        avgpool = (embed_dim >= 768) if avgpool is None else avgpool
    else:
        n_last_blocks, avgpool = 1, False
    return Recipe(model, strategy, preprocess, multiscale, source, weights_identity(weights), dtype,
                  n_last_blocks, bool(avgpool), tuple(sorted((arch or {}).items())))


# ------------------------------------------------------------------------------------------ preprocessing

def build_transform(recipe: Recipe):
    """PIL image -> normalised tensor of ``recipe.input_size()``.

    crop: short side to size/0.875 then centre-crop (DINO's evaluation, the original pipeline);
    squash: resize to a square, distorting the 2:3 banner; keep: the banner's own 2:3 shape, nothing lost.
    """
    spec = get_spec(recipe.model)
    interpolation = T.InterpolationMode(spec.interpolation)
    height, width = recipe.input_size()
    if recipe.preprocess == "crop":
        resize = [T.Resize(int(width / 0.875), interpolation=interpolation, antialias=True), T.CenterCrop(width)]
    elif recipe.preprocess == "squash":
        resize = [T.Resize((height, width), interpolation=interpolation, antialias=True)]
    else:
        resize = [T.Resize(width, interpolation=interpolation, antialias=True), T.CenterCrop((height, width))]
    return T.Compose([T.PILToTensor(), *resize, T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std)])


# ------------------------------------------------------------------------------------------ strategies

def pool_tokens(tokens: Sequence[torch.Tensor], recipe: Recipe, backbone: Backbone) -> torch.Tensor:
    """Un-normalised feature vectors from the last blocks' token sequences (DINO's eval scripts)."""
    last = tokens[-1]
    cls = last[:, 0]
    patches = last[:, backbone.num_prefix_tokens:]
    if recipe.strategy == "simple":  # eval_knn
        return cls
    if recipe.strategy == "mean":  # BEiT's own pooling
        return backbone.pool_norm(patches.mean(dim=1))
    if recipe.strategy == "gem":  # copy detection: CLS + GeM(p=4) of patch tokens
        return torch.cat((cls, patches.clamp(min=1e-6).pow(4).mean(dim=1).pow(1 / 4)), dim=-1)
    # complex = eval_linear: CLS of the last n blocks, optionally with the mean final patch token
    out = [t[:, 0] for t in tokens[-recipe.n_last_blocks:]]
    if recipe.avgpool:
        out.append(patches.mean(dim=1))
    return torch.cat(out, dim=-1)


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


@torch.inference_mode()
def compute_features(backbone: Backbone, images: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """L2-normalised features ``[B, F]`` (float32) for a batch of preprocessed images."""
    device = images.device
    n_last = recipe.n_last_blocks
    patch = backbone.spec.patch_size
    total = None
    for scale in MULTISCALE if recipe.multiscale else (1.0,):
        x = images
        if scale != 1.0:  # whole image rescaled to whole patches (DINO's conv would drop the remainder)
            size = [max(patch, int(s * scale) // patch * patch) for s in images.shape[-2:]]
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        with _autocast(device, recipe.dtype):
            feats = pool_tokens(backbone(x, n_last), recipe, backbone).float()
        total = feats if total is None else total + feats
    # Normalised per image; DINO's multi_scale helper divides by the norm of the whole batch.
    return F.normalize(total, dim=-1)


class CompiledEmbedder:
    """``compute_features`` through ``torch.compile``, with the weights frozen into the graph (inference only).

    On the 2-core CPU of BENCHMARKS.md the compiled ViT-S/16 ran 1.23x the eager one after 9-26 s of compiling
    (warm or cold compiler cache), so it pays off from about 3,000-9,000 images. Batches are padded to one size,
    so the graph is compiled once; if compiling fails (no C++ compiler, an unsupported operation), the eager
    model goes on.
    """

    def __init__(self, backbone: Backbone, recipe: Recipe, batch_size: int):
        import torch._inductor.config  # noqa: F401  (freezing is set per call below)

        self.backbone, self.recipe, self.batch_size = backbone, recipe, batch_size
        self.compiled = torch.compile(backbone, dynamic=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            n = len(images)
            padded = torch.cat([images, images.new_zeros(self.batch_size - n, *images.shape[1:])]) \
                if n < self.batch_size else images
            try:
                with torch._inductor.config.patch(freezing=True):
                    return compute_features(self.compiled, padded, self.recipe)[:n]
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # compilers fail in too many ways to list; the eager model is always there
                log.warning("torch.compile failed, embedding without it: %s", str(exc).strip().splitlines()[0])
                self.compiled = None
        return compute_features(self.backbone, images, self.recipe)


@contextlib.contextmanager
def _cpu_heap_kept(device: torch.device):
    """glibc's malloc hands big freed blocks back to the OS and faults fresh pages in for the next batch: that
    churn made the model 1.2x slower inside ``extract_features`` than alone (BENCHMARKS.md). So blocks under
    256 MB come from the heap and up to 1 GB of it stays free between batches (process-wide settings, they
    stay); when the run ends, the free memory goes back to the OS. No-op without glibc."""
    libc = None
    try:
        if device.type == "cpu":
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
            libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: blocks below 256 MB come from the heap, are reused
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap between batches
    except (OSError, AttributeError):
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


def load_backbone(recipe: Recipe, weights: str | Path | None = None, device=None) -> Backbone:
    """The model a recipe names; local ``weights`` must be the very file the recipe was made with."""
    if weights_identity(weights) != recipe.weights:
        raise BannermatchError(
            "these features were made with " + (f"local weights {recipe.weights}" if recipe.weights else "the published weights")
            + "; pass the same --weights to embed queries"
        )
    backbone = create_model(recipe.model, recipe.source, weights, dict(recipe.arch) or None, recipe.input_size())
    if recipe.n_last_blocks > backbone.depth:
        raise BannermatchError(f"n_last_blocks={recipe.n_last_blocks} but {recipe.model} has {backbone.depth} blocks")
    device = resolve_device(device)
    # On CPU, at these batch sizes, plain attention ran 1.09x (ViT-B/16) to 1.39x (ViT-S/8) faster than PyTorch's
    # fused kernel (BENCHMARKS.md); on a GPU the fused (flash) kernel is the fast one.
    backbone.set_fused_attention(device.type != "cpu")
    return backbone.to(device)


def embed_images(images: Iterable[Image.Image], recipe: Recipe, backbone: Backbone, batch_size: int = 32) -> np.ndarray:
    """Features for in-memory images (queries), with exactly the stored recipe's preprocessing."""
    transform = build_transform(recipe)
    device = next(backbone.parameters()).device
    out = []
    batch: list[torch.Tensor] = []
    for img in [*images, None]:
        if img is not None:
            batch.append(transform(img.convert("RGB")))
        if batch and (img is None or len(batch) == batch_size):
            out.append(compute_features(backbone, torch.stack(batch).to(device), recipe).cpu().numpy())
            batch = []
    if not out:
        return np.zeros((0, recipe.feature_dim(backbone.embed_dim)), np.float32)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ feature store

@dataclass
class FeatureSet:
    """Features of a collection under one recipe: row i of ``features`` belongs to ``keys[i]``."""

    path: Path
    recipe: Recipe
    keys: list[str]
    features: np.ndarray  # float32, L2-normalised
    names: dict[str, str] = field(default_factory=dict)
    skipped: list[list[str]] = field(default_factory=list)
    images: str = ""

    def index_map(self) -> dict[str, int]:
        if getattr(self, "_index", None) is None or len(self._index) != len(self.keys):
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def index_of(self, key: str) -> int:
        try:
            return self.index_map()[key]
        except KeyError:
            raise BannermatchError(f"{key!r} is not in this feature set ({len(self.keys)} banners)") from None

    def name(self, key: str) -> str:
        return self.names.get(key, "")


def _save_manifest(path: Path, manifest: dict) -> None:
    atomic_write(path / MANIFEST, lambda fh: fh.write(json.dumps(manifest).encode()))


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise BannermatchError(f"no feature set at {path} (no {MANIFEST}); run `bannermatch embed` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BannermatchError(f"{file} is damaged (not valid JSON); delete {path} and embed again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "recipe" not in manifest:
        raise BannermatchError(f"{file} is not a bannermatch manifest of this format; delete {path} and embed again")
    if manifest.get("library") != __version__:  # features may differ between versions: never mix them
        raise BannermatchError(f"{file} was written by bannermatch {manifest.get('library')}, this is {__version__}; "
                               f"delete {path} (or use another --store) and embed again")
    return manifest


class _Decoded(IterableDataset):
    """Reads, decodes and preprocesses the wanted images; each DataLoader worker takes every W-th one."""

    def __init__(self, source: ImageSource, todo: set[int], transform):
        self.source, self.todo, self.transform = source, todo, transform

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = sorted(self.todo)[wid::workers]
        mine_set = set(mine)
        for i, _, data in self.source.read(mine_set.__contains__):
            try:
                yield i, self.transform(decode_image(data)), ""
            except SkipImage as exc:
                yield i, None, str(exc)


def _collate(samples):
    ok = [(i, x) for i, x, _ in samples if x is not None]
    skipped = [(i, reason) for i, x, reason in samples if x is None]
    images = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], images, skipped


def extract_features(
    images: str | Path | ImageSource,
    recipe: Recipe,
    store: str | Path = "features",
    weights: str | Path | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    chunk_size: int = 2048,
    progress: bool = True,
    compile: bool = False,
) -> FeatureSet:
    """Embed every image of a collection with ``recipe`` into ``store/<recipe.slug>/``, resuming if possible.

    Unusable images are skipped with a warning and listed in the manifest; the run goes on. ``batch_size``
    defaults to :func:`default_batch_size`; ``workers`` (decoding processes) to none on a CPU, up to 4 with a GPU.
    ``compile`` runs the model through ``torch.compile`` (see :class:`CompiledEmbedder`): worth it for thousands
    of images.
    """
    from tqdm.auto import tqdm

    source = images if isinstance(images, ImageSource) else open_source(images)
    path = Path(store) / recipe.slug
    path.mkdir(parents=True, exist_ok=True)
    fingerprint = source.fingerprint()
    manifest = {"format": FORMAT_VERSION, "library": __version__, "recipe": recipe.to_dict(),
                "images": str(source.path), "fingerprint": fingerprint, "count": len(source),
                "chunk_size": chunk_size, "chunks": {}, "listing_report": source.report.to_dict()}
    if (path / MANIFEST).exists():
        old = _read_manifest(path)
        if old["recipe"] != manifest["recipe"]:
            raise BannermatchError(f"{path} holds features of another recipe; choose another --store")
        if old.get("fingerprint") == fingerprint and old.get("chunk_size") == chunk_size:
            manifest["chunks"] = {c: v for c, v in old["chunks"].items()  # damaged chunks are recomputed
                                  if (path / v["file"]).is_file() and file_digest(path / v["file"]) == v.get("sha256")}
        else:
            log.info("%s: the images changed since the last run; embedding again", path)
    n_chunks = math.ceil(len(source) / chunk_size)
    todo = {i for c in range(n_chunks) if str(c) not in manifest["chunks"]
            for i in range(c * chunk_size, min(len(source), (c + 1) * chunk_size))}
    if todo:
        dev = resolve_device(device)
        backbone = load_backbone(recipe, weights, dev)
        if manifest["chunks"]:
            log.info("resuming: %d of %d chunks already done", len(manifest["chunks"]), n_chunks)
        if workers is None:  # on a CPU the model's threads use every core already; a decoding process only
            # preempts them (2 cores: 92% of model-only throughput with none, 86% with 2; BENCHMARKS.md)
            workers = 0 if dev.type == "cpu" else min(4, os.cpu_count() or 1)
        batch_size = batch_size or default_batch_size(recipe, dev)
        loader = DataLoader(_Decoded(source, todo, build_transform(recipe)), batch_size=batch_size,
                            num_workers=workers, collate_fn=_collate, pin_memory=dev.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if workers else None)
        embed = CompiledEmbedder(backbone, recipe, batch_size) if compile else (
            lambda images: compute_features(backbone, images, recipe))
        with _cpu_heap_kept(dev):
            pending: dict[int, dict] = {}
            bar = tqdm(total=len(todo), desc=f"embedding {recipe.label}", unit="img", disable=not progress)
            for indices, batch, skipped in loader:
                feats = embed(batch.to(dev, non_blocking=True)).cpu().numpy() if indices else []
                for i, f in zip(indices, feats):
                    pending.setdefault(i // chunk_size, {"ok": {}, "skipped": {}})["ok"][i] = f
                for i, reason in skipped:
                    log.warning("skipped %s: %s", source.entries[i].key, reason)
                    pending.setdefault(i // chunk_size, {"ok": {}, "skipped": {}})["skipped"][i] = reason
                bar.update(len(indices) + len(skipped))
                for c in [c for c, p in pending.items() if len(p["ok"]) + len(p["skipped"]) == _chunk_len(c, chunk_size, len(source))]:
                    _write_chunk(path, manifest, c, pending.pop(c), source, backbone, recipe)
            bar.close()
    return load_features(path, recipe)


def _chunk_len(c: int, chunk_size: int, total: int) -> int:
    return min(total, (c + 1) * chunk_size) - c * chunk_size


def _write_chunk(path: Path, manifest: dict, c: int, done: dict, source: ImageSource, backbone, recipe) -> None:
    order = sorted(done["ok"])
    feats = (np.stack([done["ok"][i] for i in order]) if order
             else np.zeros((0, recipe.feature_dim(backbone.embed_dim)), np.float32)).astype(np.float16)
    file = f"chunk_{c:05d}.npy"
    atomic_write(path / file, lambda fh: np.save(fh, feats, allow_pickle=False))
    manifest["chunks"][str(c)] = {
        "file": file,
        "sha256": file_digest(path / file),
        "keys": [source.entries[i].key for i in order],
        "names": {source.entries[i].key: source.entries[i].name for i in order if source.entries[i].name},
        "skipped": [[source.entries[i].key, r] for i, r in sorted(done["skipped"].items())],
    }
    _save_manifest(path, manifest)


def load_features(path: str | Path, recipe: Recipe | None = None) -> FeatureSet:
    """Open a stored feature set; with ``recipe``, refuse one made with a different recipe."""
    path = Path(path)
    manifest = _read_manifest(path)
    stored = Recipe.from_dict(manifest["recipe"])
    if recipe is not None and stored != recipe:
        diff = ", ".join(f"{k}: stored {v!r}, asked {getattr(recipe, k)!r}"
                         for k, v in stored.to_dict().items() if recipe.to_dict()[k] != v)
        raise BannermatchError(f"{path} was made with another recipe ({diff})")
    n_chunks = math.ceil(manifest["count"] / manifest["chunk_size"])
    missing = [c for c in range(n_chunks) if str(c) not in manifest["chunks"]]
    if missing:
        raise BannermatchError(f"{path} is incomplete ({len(missing)} of {n_chunks} chunks missing); run embed again to resume")
    keys, arrays, names, skipped = [], [], {}, []
    for c in range(n_chunks):
        info = manifest["chunks"][str(c)]
        file = path / info["file"]
        if file.is_file() and file_digest(file) != info.get("sha256"):
            raise BannermatchError(f"{file} was changed or damaged since it was written; delete it and run embed again")
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BannermatchError(f"{file} is damaged ({exc}); delete it and run embed again to recompute it") from None
        if arr.ndim != 2 or arr.shape[0] != len(info["keys"]) or (arrays and arr.shape[1] != arrays[0].shape[1]):
            raise BannermatchError(f"{file} does not match its manifest; delete it and run embed again to recompute it")
        keys += info["keys"]
        arrays.append(arr)
        names.update(info.get("names", {}))
        skipped += info.get("skipped", [])
    features = np.concatenate(arrays).astype(np.float32)
    if len(features) and not np.all(np.isfinite(features)):
        raise BannermatchError(f"{path} holds non-finite features; delete it and embed again")
    skipped += manifest.get("listing_report", {}).get("skipped", [])
    return FeatureSet(path, stored, keys, features, names, skipped, manifest.get("images", ""))


def list_feature_sets(store: str | Path = "features") -> list[FeatureSet]:
    """Every complete feature set under ``store`` (for pickers such as the explorer)."""
    out = []
    for manifest in sorted(Path(store).glob(f"*/{MANIFEST}")):
        try:
            out.append(load_features(manifest.parent))
        except BannermatchError as exc:
            log.warning("ignoring %s: %s", manifest.parent, exc)
    return out
