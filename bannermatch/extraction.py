"""Extraction: preprocessing, the batched forward pass, and embedding a collection into the feature store.

Extraction is batched and streamed (images are read, hashed, decoded and resized while the model runs), runs
the model in its working precision (its weights in bf16 or fp16 where the hardware computes them natively),
compiles it when the collection is large enough for compiling to pay, and writes each finished segment to the
store at once, so an interrupted run resumes where it stopped and a re-run embeds only banners whose bytes are new.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .backbones import Backbone, create_model, get_spec, weights_identity
from .errors import BannermatchError
from .pooling import COMPONENTS, pool_components, view
from .recipe import (MULTISCALE, STORED_BLOCKS, Recipe, default_batch_size, resolve_device, resolve_dtype)
from .snapshots import snapshot_in
from .sources import (ImageSource, SkipImage, Unreadable, decode_pixels, open_source, pil_to_tensor,
                      prepare_image)
from .store import DEFAULT_STORE, FeatureSet, FeatureStore, content_digest, listing_identity

log = logging.getLogger(__name__)

_KEEP_MIN_ASPECT = 1.25  # height / width below which `keep` pads the banner (2:3 is 1.5)


# ------------------------------------------------------------------------------------------ preprocessing

class Preprocess:
    """A recipe's preprocessing, in two steps: :meth:`resize` (uint8 pixels ``[3, H, W]``, per image, where decoding
    runs) and :meth:`normalise` (uint8 images -> float32, a whole batch at once, where the model
    runs: a quarter of the bytes through the loader and to a GPU). Calling it does both for one PIL image.

    crop: short side to size/0.875 then centre-crop (DINO's evaluation, the original pipeline);
    squash: resize to a square, distorting the 2:3 banner; keep: the banner's own 2:3 shape, nothing lost.
    Value for value torchvision's ``Compose`` of the same transforms (tested), at about 60% of its cost per image:
    its dispatch was a third of it.
    """

    def __init__(self, recipe: Recipe):
        spec = get_spec(recipe.model)
        self.interpolation = T.InterpolationMode(spec.interpolation)
        height, width = recipe.input_size()
        self.size, self.crop = {"crop": ([int(width / 0.875)], [width, width]), "squash": ([height, width], None),
                                "keep": ([width], [height, width])}[recipe.preprocess]
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (spec.mean, spec.std))

    def resize(self, pixels: torch.Tensor) -> torch.Tensor:
        x = TF.resize(pixels, self.size, interpolation=self.interpolation, antialias=True)
        return x if self.crop is None else TF.center_crop(x, self.crop)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # what resize gives; a float tensor would be changed in place below
            raise TypeError(f"normalise takes uint8 images, not {images.dtype}")
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return images.to(torch.float32).mul_(1 / 255).sub_(mean).div_(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalise(self.resize(pil_to_tensor(img)))


def decode_size(recipe: Recipe) -> tuple[int, int]:
    """(height, width) that :class:`Preprocess` needs before it resizes: the ``min_size`` hint of
    :func:`~bannermatch.sources.decode_pixels`, so large JPEGs are decoded straight at a smaller scale."""
    height, width = recipe.input_size()
    if recipe.preprocess == "crop":  # the short side is resized to width/0.875, then cropped
        side = int(width / 0.875)
        return side, side
    if recipe.preprocess == "keep":  # the short side is resized to the width, then cropped to the height
        return width, width
    return height, width


def _padded_by_keep(pixels: torch.Tensor, recipe: Recipe) -> bool:
    return recipe.preprocess == "keep" and pixels.shape[-2] / pixels.shape[-1] < _KEEP_MIN_ASPECT


# ------------------------------------------------------------------------------------------ the forward pass

@torch.inference_mode()
def compute_components(backbone: Backbone, images: torch.Tensor, recipe: Recipe) -> dict[str, torch.Tensor]:
    """One forward pass per scale, in the backbone's working precision (:meth:`~bannermatch.backbones.Backbone.in_precision`),
    -> the pooling components (:mod:`bannermatch.pooling`), float32, summed over scales: every strategy is read
    from them."""
    patch = backbone.spec.patch_size
    n_last = min(STORED_BLOCKS, backbone.depth)
    total: dict[str, torch.Tensor] | None = None
    for scale in MULTISCALE if recipe.multiscale else (1.0,):
        x = images
        if scale != 1.0:  # whole image rescaled to whole patches (DINO's conv would drop the remainder)
            size = [max(patch, int(s * scale) // patch * patch) for s in images.shape[-2:]]
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        parts = pool_components(backbone(x.to(backbone.dtype), n_last), backbone.pool_norm)
        parts = {name: value.float() for name, value in parts.items()}
        total = parts if total is None else {name: total[name] + parts[name] for name in total}
    return total


def compute_features(backbone: Backbone, images: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """L2-normalised features ``[B, F]`` (float32) of ``recipe``'s strategy for a batch of preprocessed images."""
    return view(compute_components(backbone, images, recipe), recipe)


# torch.compile on each device and precision, as `python -m benchmarks --only embedding` measured it (BENCHMARKS.md
# runs 8 and 11, 2-core AMX CPU, bf16 weights, 2 threads): seconds of compiling (cold compiler cache) and the
# compiled model's speed-up over the eager one, rounded against compiling (quiet, fused attention: 9.6 s, 1.27x;
# plain attention: 11.4-11.8 s, 1.11-1.23x; loaded: 15 s, 1.09x), so it is chosen past about 7,500 banners
# there. Where none is listed compiling is not known to pay and is off unless asked for: on an AVX2 CPU the
# compiled fp32 model ran slower than the eager one (run 7); on GPUs it is unmeasured.
COMPILE_GAINS: dict[tuple[str, str], tuple[float, float]] = {("cpu", "bfloat16"): (12.0, 1.2)}


def compile_break_even(model_seconds: float, device: torch.device, dtype: str) -> float | None:
    """Images after which compiling has paid for itself: its seconds over the seconds it saves an image, from the
    eager model's measured ``model_seconds`` an image; None where compiling is not known to pay."""
    gain = COMPILE_GAINS.get((device.type, dtype))
    if gain is None or gain[1] <= 1:  # no faster compiled: it never pays
        return None
    seconds, speedup = gain
    return seconds / (model_seconds * (1 - 1 / speedup))


class CompiledEmbedder:
    """``compute_components`` through ``torch.compile``, with the weights frozen into the graph (inference only).

    The speed-up and the seconds of compiling per device are :data:`COMPILE_GAINS`. Batches are padded to one
    size, so the graph is compiled once; if compiling fails (no C++ compiler, an unsupported operation), the
    eager model goes on.
    """

    def __init__(self, backbone: Backbone, recipe: Recipe, batch_size: int):
        import torch._inductor.config  # noqa: F401  (freezing is set per call below)

        self.backbone, self.recipe, self.batch_size = backbone, recipe, batch_size
        self.compiled = torch.compile(backbone, dynamic=False)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.compiled is not None:
            n = len(images)
            padded = torch.cat([images, images.new_zeros(self.batch_size - n, *images.shape[1:])]) \
                if n < self.batch_size else images
            try:
                with torch._inductor.config.patch(freezing=True):
                    parts = compute_components(self.compiled, padded, self.recipe)
                return {name: value[:n] for name, value in parts.items()}
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # compilers fail in too many ways to list; the eager model is always there
                log.warning("torch.compile failed, embedding without it: %s", str(exc).strip().splitlines()[0])
                self.compiled = None
        return compute_components(self.backbone, images, self.recipe)


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


def load_backbone(recipe: Recipe, weights: str | Path | None = None, device=None, dtype: str = "float32") -> Backbone:
    """The model a recipe names, on ``device``, its weights in ``dtype`` (``auto``: see
    :func:`~bannermatch.recipe.resolve_dtype`); local ``weights`` must be the very file the recipe was made with."""
    if weights_identity(weights) != recipe.weights:
        raise BannermatchError(
            "these features were made with " + (f"local weights {recipe.weights}" if recipe.weights else "the published weights")
            + "; pass the same --weights to embed queries"
        )
    backbone = create_model(recipe.model, recipe.source, weights, dict(recipe.arch) or None)
    device = resolve_device(device)
    working = getattr(torch, resolve_dtype(dtype, device))
    # PyTorch's fused kernel: on a GPU the flash kernel; on CPU, with torch 2.11 (Colab's) and 2.14, it ran 1.02-1.6x
    # faster than the plain softmax(QK^T)V in fp32, bf16 and on AVX2 kernels (BENCHMARKS.md run 11; plain was the
    # faster one with the torch of runs 1-2). Not for fp16 on a CPU (asked for, never chosen: fp16 is for older
    # GPUs): that kernel changed a copy's nearest banner on real weights, the plain products did not.
    backbone.set_fused_attention(not (device.type == "cpu" and working == torch.float16))
    return backbone.to(device).in_precision(working)


def embed_components(images: Iterable[Image.Image], recipe: Recipe, backbone: Backbone,
                     batch_size: int = 32) -> dict[str, np.ndarray]:
    """Pooling components for in-memory images (queries, edited copies), decoded and preprocessed exactly as the
    stored banners were, in the backbone's precision."""
    preprocess = Preprocess(recipe)
    device = next(backbone.parameters()).device
    out: dict[str, list[np.ndarray]] = {name: [] for name in COMPONENTS}
    batch: list[torch.Tensor] = []
    for img in [*images, None]:
        if img is not None:
            batch.append(preprocess.resize(pil_to_tensor(prepare_image(img))))
        if batch and (img is None or len(batch) == batch_size):
            parts = compute_components(backbone, preprocess.normalise(torch.stack(batch).to(device)), recipe)
            for name in COMPONENTS:
                out[name].append(parts[name].cpu().numpy())
            batch = []
    if not out["cls"]:
        blocks = min(STORED_BLOCKS, backbone.depth)
        return {"cls": np.zeros((0, blocks, backbone.embed_dim), np.float32),
                **{name: np.zeros((0, backbone.embed_dim), np.float32) for name in ("mean", "gem")}}
    return {name: np.concatenate(values) for name, values in out.items()}


def embed_images(images: Iterable[Image.Image], recipe: Recipe, backbone: Backbone, batch_size: int = 32) -> np.ndarray:
    """Features of ``recipe``'s strategy for in-memory images, as :func:`embed_components`."""
    return view(embed_components(images, recipe, backbone, batch_size), recipe).numpy()


# ------------------------------------------------------------------------------------------ a collection

class _Decoded(IterableDataset):
    """Reads the wanted images, hashes their bytes, and decodes and resizes those whose digest is not stored yet;
    each DataLoader worker takes every W-th one. Yields what :meth:`_prepared` gives."""

    def __init__(self, source: ImageSource, todo: list[int], stored: set[str], recipe: Recipe):
        self.source, self.todo, self.stored, self.recipe = source, todo, stored, recipe
        self.preprocess = Preprocess(recipe)
        self.min_size = decode_size(recipe)

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        # In the model's process, images are decoded on every core between its batches (PIL and torch let go of the
        # GIL: 1.3-1.6x on 2 cores); a decoding process has one. A few stay in flight, in order.
        lanes = 1 if info else max(1, torch.get_num_threads())
        with ThreadPoolExecutor(lanes, thread_name_prefix="bannermatch-decode") as pool:
            window: deque[Future] = deque()
            for job in self._new(set(self.todo[wid::workers])):
                window.append(pool.submit(self._prepared, *job))
                if len(window) > lanes:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def _new(self, mine: set[int]):
        """``(index, digest, bytes | None, skip reason)`` in order; bytes only where they are to be decoded."""
        seen = set(self.stored)
        for i, _, data in self.source.read(mine.__contains__):
            if isinstance(data, Unreadable):  # the archive, not the image, is at fault: tried again next run
                yield i, None, None, data.reason
                continue
            digest = content_digest(data)
            if digest in seen:  # stored already, or the same bytes earlier in this run (placeholders)
                yield i, digest, None, ""
                continue
            seen.add(digest)
            yield i, digest, data, ""

    def _prepared(self, i: int, digest: str | None, data: bytes | None, reason: str):
        """``(index, digest, uint8 tensor | None, skip reason, seconds it took on its thread)``."""
        if data is None:
            return i, digest, None, reason, 0.0
        start = time.perf_counter()
        try:
            pixels = decode_pixels(data, self.min_size)
            resized = self.preprocess.resize(pixels)
            return i, digest, resized, "padded" if _padded_by_keep(pixels, self.recipe) else "", time.perf_counter() - start
        except SkipImage as exc:
            return i, digest, None, str(exc) or "unusable", time.perf_counter() - start


def _collate(samples):
    embed = [(i, d, x) for i, d, x, _, _ in samples if x is not None]
    return {"indices": [i for i, _, _ in embed], "digests": [d for _, d, _ in embed],
            "images": torch.stack([x for _, _, x in embed]) if embed else None,
            "settled": [(i, d) for i, d, x, r, _ in samples if x is None and not r],
            "skipped": [(i, d, r) for i, d, x, r, _ in samples if x is None and r],
            "padded": sum(r == "padded" for _, _, x, r, _ in samples if x is not None),
            "decoding_s": sum(seconds for *_, seconds in samples)}


class _Pace:
    """Seconds per image spent decoding (in this process, on its threads) and in the model over the first
    batches: how many decoding processes keep the model fed."""

    WARMUP = 1  # the model's first call pays for its set-up
    MEASURED = 2  # model batches timed after it
    INLINE_SHARE = 0.1  # decoding in this process while it costs at most this share of the model's time

    def __init__(self):
        self.decode_s = self.one_lane_s = self.model_s = 0.0
        self.decoded_n = self.modelled_n = self.model_batches = 0

    def decoded(self, n: int, seconds: float, one_lane_seconds: float) -> None:
        """``n`` images took ``seconds`` here (on every core) and ``one_lane_seconds`` summed over their threads
        (what a decoding process, which has one, would take)."""
        if n:
            self.decode_s, self.one_lane_s, self.decoded_n = (self.decode_s + seconds, self.one_lane_s + one_lane_seconds,
                                                              self.decoded_n + n)

    def modelled(self, n: int, seconds: float) -> None:
        self.model_batches += 1
        if self.model_batches > self.WARMUP:
            self.model_s, self.modelled_n = self.model_s + seconds, self.modelled_n + n

    @property
    def model_measured(self) -> bool:
        return self.model_batches >= self.WARMUP + self.MEASURED and self.modelled_n > 0

    @property
    def ready(self) -> bool:
        return self.model_measured and self.decoded_n > 0

    def workers(self, cpus: int) -> int:
        """0 (decoding inline) while decoding here is cheap beside the model; else as many processes as decode at
        the model's rate, at most one per core."""
        model = max(self.model_s / self.modelled_n, 1e-9)
        if (self.decode_s / self.decoded_n) / model <= self.INLINE_SHARE:
            return 0
        return min(cpus, math.ceil((self.one_lane_s / self.decoded_n) / model))


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decoded_batches(source: ImageSource, todo: list[int], stored: set[str], recipe: Recipe, batch_size: int,
                     workers: int | None, pace: _Pace, pin_memory: bool = False):
    """The batches of ``todo``, decoded by ``workers`` processes. With ``workers`` None, the first batches are
    decoded in this process while ``pace`` (which the caller feeds with the model's time) compares decoding with
    the model, and the rest by as many processes as the measurement asks for."""
    def loader(todo, stored, workers):
        return DataLoader(_Decoded(source, todo, stored, recipe), batch_size=batch_size, num_workers=workers,
                          collate_fn=_collate, pin_memory=pin_memory, prefetch_factor=4 if workers else None)

    if workers is not None:
        yield from loader(todo, stored, workers)
        return
    batches = iter(loader(todo, stored, 0))
    done, seen = set(), set()
    while not pace.ready:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        pace.decoded(len(batch["indices"]), time.perf_counter() - start, batch["decoding_s"])
        done.update(batch["indices"], (i for i, _ in batch["settled"]), (i for i, _, _ in batch["skipped"]))
        seen.update(batch["digests"], (d for _, d in batch["settled"]))
        yield batch
    workers = pace.workers(_usable_cpus())
    log.info("decoding: %.1f ms an image, the model: %.1f ms; %s", 1e3 * pace.decode_s / pace.decoded_n,
             1e3 * pace.model_s / pace.modelled_n, f"{workers} decoding processes" if workers else "decoding inline")
    if workers == 0:
        yield from batches
        return
    del batches  # closes the inline reader's archive before the processes open theirs
    rest = [i for i in todo if i not in done]
    if rest:
        yield from loader(rest, stored | seen, workers)


def extract_features(
    images: str | Path | ImageSource,
    recipe: Recipe,
    store: str | Path = DEFAULT_STORE,
    weights: str | Path | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    chunk_size: int = 2048,
    progress: bool = True,
    compile: bool | None = None,
    dtype: str = "auto",
    limit: int | None = None,
    include: Iterable[str] = (),
) -> FeatureSet:
    """Embed a collection with ``recipe``'s forward pass into ``store/<recipe.slug>/`` and return its features.

    Only banners whose bytes are not stored yet are embedded: a re-run embeds nothing, an update embeds what is
    new or changed, an interrupted run resumes. Unusable images are skipped with a warning and listed; the run
    goes on. ``dtype`` is the model's working precision, its weights cast to it (``auto``: bf16/fp16 where the
    hardware computes it natively, else fp32); the pooled components are accumulated in fp32 whatever it is;
    ``batch_size`` defaults to :func:`~bannermatch.recipe.default_batch_size`; ``workers`` (decoding processes)
    to none on a CPU, and with a GPU to as many as keep up with the model, timed on the first batches.
    ``compile`` runs the model through ``torch.compile`` (:class:`CompiledEmbedder`); by default (None) the
    first batches run eager, and the rest compiled if they outnumber the break-even of :func:`compile_break_even`
    on this device (logged beside the time estimate). ``limit`` embeds a sample of that many banners
    chosen by app id (:meth:`~bannermatch.sources.ImageSource.sample`: the same for the same ``limit``, with the
    keys of ``include`` among them), to try a setting quickly; the sample's features are kept for the full run,
    and the pass is read as the sample until the full collection is embedded.
    """
    from tqdm.auto import tqdm

    source = images if isinstance(images, ImageSource) else open_source(images)
    if (snapshot := snapshot_in(source.path)) is not None:
        snapshot.check_preprocess(recipe.preprocess)
    if limit is not None:
        if limit < 1:
            raise BannermatchError("limit must be at least 1")
        source = source.sample(limit, include=include)  # recorded as the sample; the stored collection stays whole
    fstore = FeatureStore.open(Path(store) / recipe.slug, recipe, create=True)
    fstore.rows()  # checks every segment's digest
    for file in fstore.damaged:
        log.warning("%s was changed or damaged since it was written; its banners are embedded again", file)
    fstore.tidy()  # what a killed writer left (a segment it did not list) must not wait for the next change
    identities = {i: listing_identity(e) for i, e in enumerate(source.entries)}
    known = fstore.manifest["identities"]
    digest_of: dict[int, str] = {i: known[ident] for i, ident in identities.items()
                                 if ident in known and fstore.known(known[ident])}
    todo = [i for i in range(len(source)) if i not in digest_of]
    unread: dict[int, str] = {}  # images whose bytes could not be read this time
    if todo:
        dev = resolve_device(device)
        run_dtype = resolve_dtype(dtype, dev)
        stored = set(fstore.rows()) | set(fstore.manifest["failed"])
        batch_size = batch_size or default_batch_size(recipe, dev)
        if workers is None and dev.type == "cpu":  # the model's threads use every core already; a decoding
            # process only preempts them (2 cores: 92% of model-only throughput with none, 86% with 2; BENCHMARKS.md)
            workers = 0
        pace = _Pace()
        preprocess = Preprocess(recipe)
        loader = _decoded_batches(source, todo, stored, recipe, batch_size, workers, pace, dev.type == "cuda")
        backbone = embed = None
        pending: dict[str, list] = {"entries": [], **{name: [] for name in COMPONENTS}}
        learnt: dict[str, str] = {}
        failed: dict[str, str] = {}  # digest -> why those bytes are not an image
        padded = 0
        run = {"dtype": run_dtype, "device": dev.type, "blocks": None}

        def flush(final: bool = False):
            """Write whole segments of ``chunk_size`` banners (and, at the end, the rest)."""
            while len(pending["entries"]) >= chunk_size or (final and pending["entries"]):
                parts = {n: np.concatenate(pending[n]) for n in COMPONENTS}
                take = min(chunk_size, len(pending["entries"]))
                fstore.add_segment(pending["entries"][:take], {n: v[:take] for n, v in parts.items()},
                                   run, dict(learnt), dict(failed))
                learnt.clear()
                failed.clear()
                pending["entries"] = pending["entries"][take:]
                for n, v in parts.items():
                    pending[n] = [v[take:]]

        with _cpu_heap_kept(dev), tqdm(total=len(todo), desc=f"embedding {recipe.label}", unit="img",
                                       disable=not progress) as bar:
            started = time.perf_counter()
            clock = _Forecast(len(todo), recipe, dev, run_dtype)
            for batch in loader:
                for i, digest in batch["settled"]:
                    digest_of[i] = digest
                    learnt[identities[i]] = digest
                for i, digest, reason in batch["skipped"]:
                    log.warning("skipped %s: %s", source.entries[i].key, reason)
                    if digest is None:
                        unread[i] = reason
                        continue
                    failed[digest] = reason
                    digest_of[i] = digest
                    learnt[identities[i]] = digest
                if batch["indices"]:
                    if backbone is None:  # loaded only when something is new
                        backbone = load_backbone(recipe, weights, dev, run_dtype)
                        run["blocks"] = min(STORED_BLOCKS, backbone.depth)
                        embed = CompiledEmbedder(backbone, recipe, batch_size) if compile else (
                            lambda x: compute_components(backbone, x, recipe))
                    start = time.perf_counter()
                    parts = embed(preprocess.normalise(batch["images"].to(dev, non_blocking=True)))
                    for name in COMPONENTS:
                        pending[name].append(parts[name].cpu().numpy())
                    pace.modelled(len(batch["indices"]), time.perf_counter() - start)
                    for i, digest in zip(batch["indices"], batch["digests"]):
                        pending["entries"].append((source.entries[i].key, digest))
                        digest_of[i] = digest
                        learnt[identities[i]] = digest
                    padded += batch["padded"]
                bar.update(len(batch["indices"]) + len(batch["settled"]) + len(batch["skipped"]))
                clock.step(len(batch["indices"]) + len(batch["settled"]) + len(batch["skipped"]))
                if compile is None and pace.model_measured:  # decided once, on the eager model's measured speed
                    compile = _compile_pays(pace.model_s / pace.modelled_n, len(todo) - clock.done, dev, run_dtype)
                    if compile:
                        embed = CompiledEmbedder(backbone, recipe, batch_size)
                flush()
            flush(final=True)
            if learnt or failed:
                fstore.record(learnt, failed)
        if padded:
            log.warning("keep: %d banners are wider than 2:3 (square archives, for one) and were padded to the "
                        "2:3 input; use crop or squash for them", padded)
        log.debug("embedded %d images in %.1f s", len(todo), time.perf_counter() - started)
    collection = _collection(fstore, source, digest_of, unread)
    if not collection["entries"]:  # nothing to match: say so now, not as an odd error of a later command
        first = "".join(f" (first: {what}: {why})" for what, why in collection["skipped"][:1])
        raise BannermatchError(f"none of the {len(source)} images in {source.path} could be used{first}; "
                               "see the warnings above")
    if source.sampled:  # a sample is not the collection: it is kept as the sample, read where no collection is
        fstore.record({}, {}, sample=collection)
    else:
        fstore.record({}, {}, collection)
    fstore.add_view(recipe)
    return fstore.feature_set(recipe, collection)


def _compile_pays(model_seconds: float, left: int, device: torch.device, dtype: str) -> bool:
    """Whether compiling pays for the ``left`` images of a run, whose eager model takes ``model_seconds`` an image;
    logged with the figures it was decided on."""
    break_even = compile_break_even(model_seconds, device, dtype)
    if break_even is None:
        return False
    seconds, speedup = COMPILE_GAINS[(device.type, dtype)]
    pays = left > break_even
    log.info("torch.compile pays from about %s banners on %s (%s): %.0f s of compiling for %.2fx the eager model's "
             "%.1f ms an image; %d left: %s", f"{math.ceil(break_even):,}", device.type, dtype, seconds, speedup,
             1e3 * model_seconds, left, "compiling" if pays else "not compiling")
    return pays


@torch.inference_mode()
def estimate_seconds(recipe: Recipe, n: int, device=None, dtype: str = "auto", batch_size: int | None = None) -> float:
    """About how long the model takes to embed ``n`` banners with ``recipe``'s pass on ``device`` (decoding not
    included), timed on two batches of the same network with random weights: nothing is downloaded."""
    dev = resolve_device(device)
    run_dtype = resolve_dtype(dtype, dev)
    spec = get_spec(recipe.model)
    timed = spec if spec.timm_name else get_spec(f"{spec.name}_ft22k")  # BEiT pt22k: the same network in timm
    resizable = timed.family != "beit"
    # an architecture override (the recipe's own, or one equal to the default) builds the network without weights
    arch = recipe.arch if recipe.arch and recipe.source == "timm" else (("embed_dim", timed.embed_dim),)
    probe = replace(recipe, model=timed.name, source="timm", weights=None, arch=arch,
                    preprocess=recipe.preprocess if resizable else "crop", multiscale=recipe.multiscale and resizable)
    scale = 1.0 if resizable else recipe.tokens() / probe.tokens() * (
        sum(s * s for s in MULTISCALE) if recipe.multiscale else 1.0)
    backbone = load_backbone(probe, None, dev, run_dtype)
    # a few images per batch on a CPU: the rate per image hardly changes, and the estimate stays quick
    batch_size = batch_size or (default_batch_size(probe, dev) if dev.type == "cuda" else 4)
    x = torch.randn(batch_size, 3, *probe.input_size(), device=dev)
    compute_components(backbone, x, probe)  # warm-up
    _synchronize(dev)
    started = time.perf_counter()
    for _ in range(2):
        compute_components(backbone, x, probe)
    _synchronize(dev)
    return n * scale * (time.perf_counter() - started) / (2 * batch_size)


CPU_SAMPLE = 1000  # banners a comparison embeds on a CPU by default: minutes per model instead of hours


def resolve_limit(limit: int | str | None, device=None) -> int | None:
    """``auto``: every banner on a GPU, a sample of :data:`CPU_SAMPLE` on a CPU."""
    if limit == "auto":
        return None if resolve_device(device).type == "cuda" else CPU_SAMPLE
    return limit


def embed_settings(images: str | Path | ImageSource, recipes: Iterable[Recipe], store: str | Path = DEFAULT_STORE,
                   weights: str | Path | None = None, device=None, limit: int | str | None = "auto",
                   include: Iterable[str] = (), compile: bool | None = None, progress: bool = True) -> list[FeatureSet]:
    """The features of several settings on the same banners (a sample of ``limit``, see :func:`resolve_limit`, with
    ``include`` among them), after printing how long it will take at most. Settings that differ only in their
    strategy share one forward pass."""
    source = images if isinstance(images, ImageSource) else open_source(images)
    limit = resolve_limit(limit, device)
    if limit is not None:
        source = source.sample(limit, include=include)
    recipes = list(recipes)
    passes = list({r.slug: r for r in recipes}.values())
    seconds = sum(estimate_seconds(r, len(source), device) for r in passes)
    print(f"{len(recipes)} settings = {len(passes)} forward passes over {len(source)} banners on "
          f"{resolve_device(device).type}: at most {format_duration(seconds)} (stored banners are not embedded again)")
    return [extract_features(source, r, store, weights, device, progress=progress, compile=compile) for r in recipes]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Forecast:
    """Says once, after the first batches, how long the whole run will take (the progress bar says it too, but
    is easy to miss in a notebook log, and a user deciding whether to wait wants it stated)."""

    WARMUP = 1  # the first batch pays for the model's first call

    def __init__(self, total: int, recipe: Recipe, device: torch.device, dtype: str):
        self.total, self.what = total, f"{recipe.model} on {device.type} ({dtype})"
        self.done = self.batches = 0
        self.since: float | None = None

    def step(self, n: int) -> None:
        self.batches += 1
        self.done += n
        if self.batches == self.WARMUP:
            self.since, self.counted = time.perf_counter(), self.done
        elif self.batches == self.WARMUP + 2 and self.done < self.total:
            rate = (self.done - self.counted) / max(time.perf_counter() - self.since, 1e-9)
            log.info("embedding %d banners with %s: about %s at %.1f banners/s", self.total, self.what,
                     format_duration((self.total - self.done) / rate), rate)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _collection(fstore: FeatureStore, source: ImageSource, digest_of: dict[int, str], unread: dict[int, str]) -> dict:
    """The listed images, in order, whose features are stored; the rest are reported."""
    failed = fstore.manifest["failed"]
    entries, skipped = [], []
    for i, e in enumerate(source.entries):
        digest = digest_of.get(i)
        if i in unread:
            skipped.append([e.key, unread[i]])
        elif digest in failed:
            skipped.append([e.key, failed[digest]])
        elif digest is not None:
            entries.append([e.key, digest])
    return {"images": str(Path(source.path).resolve()), "entries": entries, "names": source.names,
            "skipped": skipped + [list(s) for s in source.report.skipped],
            "duplicates": [list(d) for d in source.report.duplicates],
            **({"sample_of": source.sampled} if source.sampled else {})}
