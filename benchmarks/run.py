"""One command, one run, one table: embedding (end to end vs an original-style pipeline vs the model alone),
all-vs-all exact top-k search (ours fp32 / bf16 vs faiss IndexFlatIP vs the full N x N matrix), and the
explorer's game name search over the real Steam app list.

Timings on a shared machine are noisy, so the compared pipelines run interleaved, ``--repeats`` times each,
on the same data, and the table gives the best and the median throughput and ratios of the best.
Each search method runs in its own subprocess so that its peak memory (Linux ``VmHWM``, reset just before the
search) is its own.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vits16": "dino_vits16", "vitb16": "dino_vitb16", "vits8": "dino_vits8"}
SEARCH_METHODS = ("ours fp32", "ours bf16", "faiss IndexFlatIP", "full N x N matrix")
PARTS = ("embedding", "at-scale", "decode", "cpu-options", "gpu", "search", "names", "scaling")
OPT_IN_PARTS = ("at-scale", "cpu-options", "gpu", "scaling")  # OpenVINO/NNCF and the real weights; a GPU; an hour: only with --only
GEMM = 2048  # the square matrix product whose rate is the arithmetic ceiling the model is measured against
DECODE_SETS = {  # (width, height): what each image source delivers
    "300x450 JPEG (Steam CDN banner)": (300, 450),
    "600x900 JPEG (CDN original)": (600, 900),
    "224x336 JPEG (snapshot)": (224, 336),
}


def _test_fixtures():
    """The test suite's fixtures module (tests/conftest.py): its banner drawer and the shared app list's path,
    so benchmarks and tests see the same data."""
    spec = importlib.util.spec_from_file_location("_bannermatch_test_fixtures", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _draw_banner():
    return _test_fixtures().draw_banner


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Linux: make the peak resident set size (VmHWM) start again from the current one."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


# ------------------------------------------------------------------------------------------ embedding

def random_checkpoint(model: str, folder: Path) -> Path:
    """Random weights of the real architecture (no download): timm builds it without pretrained weights when
    given an architecture override, here the architecture's own depth."""
    from bannermatch.backbones import create_model

    depth = 12  # every DINO ViT has 12 blocks
    path = folder / f"{model}_random.pth"
    torch.save(create_model(model, "timm", arch={"depth": depth}).model.state_dict(), path)
    return path


def original_pipeline(images: list[Path], model: str, weights: Path, out: Path) -> float:
    """The original notebooks' way: PIL per image, Resize(256) + CenterCrop(224), fp32, batch size 1, eager attention.
    Returns the seconds of its loop over the images (the model loaded)."""
    from PIL import Image
    from torchvision import transforms as T1

    from bannermatch.extraction import load_backbone
    from bannermatch.recipe import make_recipe

    recipe = make_recipe(model, weights=weights)
    backbone = load_backbone(recipe, weights, "cpu")
    for blk in backbone.model.blocks:
        blk.attn.fused_attn = False
    transform = T1.Compose([T1.Resize(256, interpolation=T1.InterpolationMode.BICUBIC), T1.CenterCrop(224),
                            T1.ToTensor(), T1.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    feats = []
    start = time.perf_counter()
    with torch.inference_mode():
        for path in images:
            x = transform(Image.open(path).convert("RGB"))[None]
            feats.append(torch.nn.functional.normalize(backbone(x)[-1][0], dim=-1)[0].numpy())
    seconds = time.perf_counter() - start
    np.save(out, np.stack(feats), allow_pickle=False)
    return seconds


def model_only(embed, recipe, batch_size: int, n: int, device="cpu") -> None:
    """The model (and pooling) alone on already preprocessed batches (already on ``device``), in the backbone's
    working precision: the ceiling for the whole pipeline. ``embed`` is a backbone (run through
    ``compute_components``) or a ``CompiledEmbedder``."""
    from bannermatch.extraction import CompiledEmbedder, compute_components

    x = torch.randn(batch_size, 3, *recipe.input_size(), device=device)
    for start in range(0, n, batch_size):  # exactly n images, a short last batch included, as end to end
        batch = x[:min(batch_size, n - start)]
        embed(batch) if isinstance(embed, CompiledEmbedder) else compute_components(embed, batch, recipe)


def autocast_model_only(backbone, recipe, batch_size: int, n: int, dtype: str, device="cpu") -> None:
    """:func:`model_only` the way extraction ran before the weights were cast (issue #21): autocast to ``dtype``
    around a float32 model."""
    with torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype)):
        model_only(backbone, recipe, batch_size, n, device)


def gemm_ceiling(dtype: str, size: int = GEMM) -> tuple[int, object]:
    """A run for :func:`_interleaved`: ten square matrix products in ``dtype`` (the arithmetic peak the model's
    matrix products can reach here), counted as ten 'images'."""
    a, b = (torch.randn(size, size).to(getattr(torch, dtype)) for _ in range(2))
    return 10, lambda: [a @ b for _ in range(10)]


def bench_embedding(args, tmp: Path) -> list[dict]:
    from benchmarks.cpu_options import model_flops
    from bannermatch.extraction import COMPILE_GAINS, CompiledEmbedder, extract_features, load_backbone
    from bannermatch.recipe import default_batch_size, make_recipe, resolve_dtype

    folder = tmp / "banners"
    folder.mkdir()
    for i, blob in enumerate(photo_jpegs((300, 450), args.images)):  # real photos: what decoding really costs
        (folder / f"{100000 + i}.jpg").write_bytes(blob)
    images = sorted(folder.glob("*.jpg"))
    baseline_images = images[:args.baseline_images]
    n = len(images)
    results = []
    for short in args.models:
        model = MODELS[short]
        weights = random_checkpoint(model, tmp)
        recipe = make_recipe(model, weights=weights)
        dtype = resolve_dtype("auto", torch.device("cpu"))
        working = load_backbone(recipe, weights, "cpu", dtype)
        fp32 = load_backbone(recipe, weights, "cpu")
        batch = args.batch_size or default_batch_size(recipe, "cpu")
        attention = "fused" if working.model.blocks[0].attn.fused_attn else "plain"
        other = "plain" if attention == "fused" else "fused"
        runs: dict[str, tuple[int, object]] = {
            "original-style (PIL, fp32, batch 1, eager attention)":
                (len(baseline_images), lambda: original_pipeline(baseline_images, model, weights, tmp / "orig.npy")),
        }
        for w in args.workers:
            runs[f"bannermatch extract_features ({dtype}, batch {batch}, workers={w})"] = (
                n, lambda w=w: extract_features(folder, recipe, tempfile.mkdtemp(dir=tmp), weights, "cpu", batch, w,
                                                progress=False, compile=False, dtype=dtype))
        runs[f"model only ({dtype}, batch {batch}, {attention} attention)"] = (
            n, lambda: model_only(working, recipe, batch, n))
        if dtype != "float32":
            runs[f"model only ({dtype} autocast over float32 weights, batch {batch}, {attention} attention)"] = (
                n, lambda: autocast_model_only(fp32, recipe, batch, n, dtype))
            runs[f"model only (float32, batch {batch}, {attention} attention)"] = (
                n, lambda: model_only(fp32, recipe, batch, n))
        runs[f"model only ({dtype}, batch {batch}, {other} attention)"] = (
            n, lambda: _with_attention(working, other == "fused", lambda: model_only(working, recipe, batch, n)))
        if batch != 64:
            runs[f"model only ({dtype}, batch 64, {attention} attention)"] = (
                n, lambda: model_only(working, recipe, 64, n))
        compile_s = None
        if args.compile:
            runs[f"bannermatch extract_features ({dtype}, batch {batch}, workers=0, compile=True)"] = (
                n, lambda: extract_features(folder, recipe, tempfile.mkdtemp(dir=tmp), weights, "cpu", batch, 0,
                                            progress=False, compile=True, dtype=dtype))
            compiled = CompiledEmbedder(working, recipe, batch)
            start = CLOCKS[args.clock]()
            model_only(compiled, recipe, batch, batch)  # the first batch compiles
            compile_s = CLOCKS[args.clock]() - start
            print(f"  [{short}] torch.compile: the first batch took {compile_s:.1f} s", file=sys.stderr)
            runs[f"model only ({dtype}, batch {batch}, {attention} attention, compiled)"] = (
                n, lambda: model_only(compiled, recipe, batch, n))
        gemm = {precision: f"GEMM {GEMM}^3 x10, {precision}" for precision in dict.fromkeys((dtype, "float32"))}
        for precision, name in gemm.items():
            runs[name] = gemm_ceiling(precision)
        rates = _interleaved(runs, args.repeats, short, args.clock)
        results.append({
            "model": model, "dtype": dtype, "flops": model_flops(working, recipe), "compile_s": compile_s,
            "clock": args.clock,
            "gain": COMPILE_GAINS.get(("cpu", dtype)),
            "gemm": {precision: max(rates.pop(name)) * 2 * GEMM ** 3 / 1e9 for precision, name in gemm.items()},
            "rows": [{"pipeline": name, "best": max(r), "median": statistics.median(r)} for name, r in rates.items()]})
    return results


def _with_attention(backbone, fused: bool, fn):
    saved = backbone.model.blocks[0].attn.fused_attn
    backbone.set_fused_attention(fused)
    try:
        return fn()
    finally:
        backbone.set_fused_attention(saved)


def print_embedding(results: list[dict]) -> None:
    per = "second of this process's CPU time" if results and results[0]["clock"] == "cpu" else "second"
    print(f"\n## Embedding throughput (images a {per}; best and median of the interleaved repeats)\n")
    print("| model | pipeline | best img/s | median img/s | vs original-style | vs model only |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        original = next(x["best"] for x in r["rows"] if x["pipeline"].startswith("original"))
        ceiling = next(x["best"] for x in r["rows"] if x["pipeline"].startswith("model only"))
        for x in r["rows"]:
            end_to_end = not x["pipeline"].startswith("model only")
            print(f"| {r['model']} | {x['pipeline']} | {x['best']:.1f} | {x['median']:.1f} | {x['best'] / original:.2f}x | "
                  + (f"{x['best'] / ceiling:.0%} |" if end_to_end else "— |"))
    for r in results:
        print(f"\n{embedding_summary(r)}")


def embedding_summary(r: dict) -> str:
    """The figures the targets are read from: end to end against the original-style loop and the model alone,
    the model's share of the GEMM ceiling of its precision, and where compiling pays."""
    best = {x["pipeline"]: x["best"] for x in r["rows"]}
    original = next(v for k, v in best.items() if k.startswith("original"))
    ours = next(v for k, v in best.items() if k.startswith("bannermatch") and k.endswith("workers=0)"))
    alone = next(v for k, v in best.items() if k.startswith("model only"))
    gflops = r["flops"] / 1e9
    ceiling = r["gemm"][r["dtype"]]
    lines = [f"{r['model']}, {gflops:.2f} GFLOP an image: end to end (workers=0) {ours:.1f} img/s, {ours / original:.2f}x "
             f"the original-style loop, {ours / alone:.0%} of the model alone in the same precision ({r['dtype']}, "
             f"{alone:.1f} img/s). The model alone computes {alone * gflops:.0f} GFLOP/s: {alone * gflops / ceiling:.0%} "
             f"of the {r['dtype']} GEMM ceiling measured in the same run ({ceiling:.0f} GFLOP/s; float32 "
             f"{r['gemm']['float32']:.0f} GFLOP/s)."]
    autocast = next((v for k, v in best.items() if "autocast" in k), None)
    if autocast:
        lines.append(f"Weights in {r['dtype']}: {alone / autocast:.2f}x autocast over float32 weights.")
    compiled = next((v for k, v in best.items() if k.startswith("model only") and k.endswith("compiled)")), None)
    if compiled and r["compile_s"] is not None:
        saved = 1 / alone - 1 / compiled  # seconds compiling saves an image
        lines.append(f"torch.compile: {r['compile_s']:.1f} s on the first batch, then {compiled:.1f} img/s "
                     f"({compiled / alone:.2f}x the eager model alone)" + (
                         f": pays from {r['compile_s'] / saved:,.0f} images" if saved > 0 else ": never pays")
                     + (f" (the library's figures, {r['gain'][0]:.0f} s for {r['gain'][1]:.2f}x, say "
                        f"{r['gain'][0] / (1 / alone * (1 - 1 / r['gain'][1])):,.0f})" if r["gain"] else "") + ".")
        if saved > 0:  # end to end with the model's time replaced by the compiled model's, compiling included
            steady = 1 / (1 / ours - saved)
            amortised = ", ".join(f"{steady * m / (m + steady * r['compile_s']):.1f} img/s "
                                  f"({steady * m / (m + steady * r['compile_s']) / original:.2f}x) at {m:,}"
                                  for m in (30_000, 100_000))
            lines.append(f"End to end compiled, derived (the eager run with the compiled model's time per image, plus "
                         f"compiling once): {amortised} banners.")
    return " ".join(lines)


def bench_at_scale(args, tmp: Path) -> dict:
    """End to end on a catalogue-sized collection (``--at-scale-images`` distinct photo banners) with every library
    default (precision, batch, decoding, and torch.compile decided by its break-even), one run, beside the
    original-style loop on ``--baseline-images`` of them just before and just after it."""
    import logging

    from bannermatch.extraction import extract_features
    from bannermatch.recipe import make_recipe

    model = MODELS[args.models[0]]
    weights = random_checkpoint(model, tmp)
    recipe = make_recipe(model, weights=weights)
    folder = tmp / "catalogue"
    folder.mkdir()
    for i, blob in enumerate(iter_photo_jpegs((300, 450), args.at_scale_images)):
        (folder / f"{100000 + i}.jpg").write_bytes(blob)
    baseline = sorted(folder.glob("*.jpg"))[:args.baseline_images]

    def original() -> float:  # its loop alone: over a catalogue, loading the model once is nothing
        return len(baseline) / original_pipeline(baseline, model, weights, tmp / "orig.npy")

    said = []  # what the library logs: the compile decision, the time estimate
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    log = logging.getLogger("bannermatch.extraction")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        before = original()
        print(f"  [at scale] original-style loop {before:.1f} img/s; embedding {args.at_scale_images:,} banners",
              file=sys.stderr)
        start = time.perf_counter()
        extract_features(folder, recipe, tmp / "store", weights, "cpu", progress=False)
        rate = args.at_scale_images / (time.perf_counter() - start)
        after = original()
    finally:  # the library's logging as it was
        log.removeHandler(handler)
        log.setLevel(level)
    return {"model": model, "images": args.at_scale_images, "rate": rate, "original": [before, after],
            "baseline": len(baseline), "said": [m for m in said if "compile" in m]}


def print_at_scale(r: dict) -> None:
    original = sum(r["original"]) / 2
    print(f"\n## End to end at scale: {r['model']}, {r['images']:,} distinct photo banners, every default\n")
    print(f"bannermatch extract_features: {r['rate']:.1f} img/s, **{r['rate'] / original:.2f}x** the original-style "
          f"loop ({r['original'][0]:.1f} img/s before it, {r['original'][1]:.1f} after, its loop over {r['baseline']} of "
          f"the banners, the model loaded). The library said: {' / '.join(r['said']) or 'nothing about compiling'}")


# ------------------------------------------------------------------------------------------ decode ceiling

def _tests_module(name: str):
    """A helper module of the test suite (real photos, the ONNX DINOv2 conversion), imported from tests/."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module(name)


def photo_jpegs(size: tuple[int, int], n: int) -> list[bytes]:
    """``n`` distinct JPEGs (quality 90) of ``size`` cut from real photographs (:func:`iter_photo_jpegs`)."""
    return list(iter_photo_jpegs(size, n))


def iter_photo_jpegs(size: tuple[int, int], n: int):
    """``n`` distinct JPEGs (quality 90) of ``size`` cut from real photographs (their entropy, unlike flat drawings,
    is what decoding costs), one at a time: each photo at a new crop each round, mirrored every other round, and
    its index written in the corner's first pixels, so no two files are the same. The store embeds a picture once
    whatever number of files hold it: with the 100 distinct files of 240 this made before, end to end was credited
    2.4x the pictures it embedded."""
    import io

    from PIL import ImageOps

    photos = _tests_module("real_photos").photos(longest=1024)
    for i in range(n):
        round_ = i // len(photos)
        img = ImageOps.fit(photos[i % len(photos)], size, centering=(round_ * 0.618 % 1, round_ * 0.382 % 1))
        if round_ % 2:
            img = ImageOps.mirror(img)
        for bit in range(n.bit_length()):  # the index, 8x8 blocks black or white: JPEG keeps them apart
            img.paste((255, 255, 255) if i >> bit & 1 else (0, 0, 0), (8 * bit, 0, 8 * bit + 8, 8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        yield buf.getvalue()


class _DecodeDataset(torch.utils.data.Dataset):
    """Exactly extraction's per-image work: decode_pixels (with or without the size hint), then the resize of
    ``Preprocess`` (its normalising is done a batch at a time, beside the model)."""

    def __init__(self, blobs: list[bytes], recipe, hint: bool):
        from bannermatch.extraction import Preprocess, decode_size

        self.blobs, self.preprocess = blobs, Preprocess(recipe)
        self.min_size = decode_size(recipe) if hint else None

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        from bannermatch.sources import decode_pixels

        return self.preprocess.resize(decode_pixels(self.blobs[i], self.min_size))


def decoder(dataset: _DecodeDataset, workers: int, batch_size: int):
    """A function that decodes every image once: in the main process (as extract_features with workers=0), or
    through a DataLoader whose workers are started here, not inside the timing (a real run starts them once
    for thousands of images). Their first pass runs here to its end: workers left prefetching would decode in
    the background of the next rows' timing."""
    if not workers:
        return lambda: [dataset[i] for i in range(len(dataset))] and None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=torch.stack,
                                         prefetch_factor=4, persistent_workers=True)
    for _ in loader:
        pass
    return lambda: [None for _ in loader] and None


def bench_decode(args, tmp: Path) -> list[dict]:
    """Decode + resize alone (no model) per image source, with and without the size hint (draft mode), in the
    main process and in 2 DataLoader workers; beside them the model alone, interleaved in the same run."""
    from bannermatch.extraction import load_backbone
    from bannermatch.recipe import default_batch_size, make_recipe

    model = MODELS[args.models[0]]
    weights = random_checkpoint(model, tmp)
    recipe = make_recipe(model, weights=weights)
    batch = args.batch_size or default_batch_size(recipe, "cpu")
    backbone = load_backbone(recipe, weights, "cpu")
    runs: dict[tuple[str, str], tuple[int, object]] = {}
    for label, size in DECODE_SETS.items():
        blobs = photo_jpegs(size, args.decode_images)
        kib = sum(map(len, blobs)) / len(blobs) / 1024
        for hint in (False, True):
            dataset = _DecodeDataset(blobs, recipe, hint)
            for w in (0, 2):
                how = f"{'draft (size hint)' if hint else 'full decode'}, " + ("main process" if not w else f"{w} workers")
                runs[(f"{label}, {kib:.0f} KiB", how)] = (len(blobs), decoder(dataset, w, batch))
    runs[(f"model only ({model})", f"float32, batch {batch}")] = (
        args.decode_images, lambda: model_only(backbone, recipe, batch, args.decode_images))
    rates = _interleaved(runs, args.repeats, "decode")
    return [{"images": k[0], "how": k[1], "best": max(r), "median": statistics.median(r)} for k, r in rates.items()]


def _cpu_seconds() -> float:
    """CPU seconds of this process and of the children it waited for (the C++ compiler, when compiling)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


CLOCKS = {"wall": time.perf_counter, "cpu": _cpu_seconds}


def _interleaved(runs: dict, repeats: int, tag: str, clock: str = "wall") -> dict:
    """Each run ``repeats`` times, interleaved so every one sees the same share of the machine's load: rates per
    second of ``clock``: the wall clock, or this process's CPU time (on a machine shared with other jobs, the
    seconds it computed rather than waited for a core)."""
    rates = {name: [] for name in runs}
    timer = CLOCKS[clock]
    for rep in range(repeats):
        for name, (n, fn) in runs.items():
            start = timer()
            fn()
            rates[name].append(n / (timer() - start))
            print(f"  [{tag} repeat {rep + 1}/{repeats}] {name}: {rates[name][-1]:.1f} img/s "
                  f"(load {_loadavg()})", file=sys.stderr)
    return rates


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in __import__("os").getloadavg())


def print_decode(rows: list[dict]) -> None:
    print("\n## Decode ceiling: decode + resize alone vs the model alone (images/s; best and median)\n")
    model = next(r for r in rows if r["images"].startswith("model only"))
    print(f"Model alone: {model['images']}, {model['how']}: {model['best']:.1f} img/s. A source whose decode rate is "
          "below it bounds the pipeline.\n")
    print("| images | decoding | best img/s | median img/s | vs full decode | vs model only | bound by |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if r is model:
            continue
        full = next(x["best"] for x in rows if x["images"] == r["images"]
                    and x["how"] == r["how"].replace("draft (size hint)", "full decode"))
        print(f"| {r['images']} | {r['how']} | {r['best']:.1f} | {r['median']:.1f} | {r['best'] / full:.2f}x | "
              f"{r['best'] / model['best']:.2f}x | {'decode' if r['best'] < model['best'] else 'model'} |")


# ------------------------------------------------------------------------------------------ search

def clustered_features(n: int, d: int, seed: int = 0, series: int = 20, spread: float = 0.6) -> np.ndarray:
    """Unit vectors in clusters of about ``series`` (as game series and genres cluster), so neighbours are
    meaningful and close; ``spread`` 0.15 with 50 to a series makes near-copies (cosine about 0.98, reskinned
    games and asset flips), whose scores sit closer together than bf16's step there (1/256)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // series), d), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def search_worker(method: str, features_file: str, k: int, out_file: str) -> None:
    """Run one search method in this (fresh) process; print seconds and peak extra memory as JSON."""
    from bannermatch.search import top_k_all_pairs, top_k_faiss

    x = np.load(features_file, allow_pickle=False)
    fns = {  # each: all against all, every banner excluded from its own list
        "ours fp32": lambda x: top_k_all_pairs(x, k, "cpu", "float32"),
        "ours bf16": lambda x: top_k_all_pairs(x, k, "cpu", "bfloat16"),
        "faiss IndexFlatIP": lambda x: top_k_faiss(x, x, k, np.arange(len(x))),
        "full N x N matrix": lambda x: _full_matrix(x, k),
    }
    fn = fns[method]
    fn(x[:256])  # warm up libraries and thread pools outside the measurement
    _reset_peak_rss()  # the peak of loading the libraries and the data is not the search's
    before = _rss_bytes()
    start = time.perf_counter()
    idx, _ = fn(x)
    seconds = time.perf_counter() - start
    np.save(out_file, idx, allow_pickle=False)
    print(json.dumps({"seconds": seconds, "extra_bytes": max(0, _peak_rss_bytes() - before)}))


def _full_matrix(x, k):
    sims = torch.from_numpy(x) @ torch.from_numpy(x).T
    sims.fill_diagonal_(-torch.inf)
    vals, idx = torch.topk(sims, k, dim=1)
    return idx.numpy(), vals.numpy()


def bench_search(args, tmp: Path) -> list[dict]:
    rows = []
    for d in args.dims:
        features_file = tmp / f"features_{d}.npy"
        np.save(features_file, clustered_features(args.search_n, d), allow_pickle=False)
        results: dict[str, dict] = {}
        for rep in range(args.search_repeats):  # interleaved, like the embedding runs; the fastest run counts
            for method in args.search_methods:
                out = tmp / f"idx_{d}_{args.search_methods.index(method)}.npy"
                cmd = [sys.executable, "-m", "benchmarks.run", "--search-worker", method, str(features_file),
                       str(args.k), str(out)]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{method} failed:\n{proc.stderr[-2000:]}")
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"  [search d={d} repeat {rep + 1}/{args.search_repeats}] {method}: {run['seconds']:.1f} s, "
                      f"{run['extra_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
                best = results.setdefault(method, {"seconds": [], "extra_bytes": 0, "idx": np.load(out)})
                best["seconds"].append(run["seconds"])
                best["extra_bytes"] = max(best["extra_bytes"], run["extra_bytes"])
        reference = results.get("ours fp32")
        for method, r in results.items():
            recall = None
            if reference is not None:
                hits = [len(set(a) & set(b)) for a, b in zip(r["idx"], reference["idx"])]
                recall = sum(hits) / reference["idx"].size
            rows.append({"d": d, "method": method, "seconds": min(r["seconds"]),
                         "median": statistics.median(r["seconds"]), "extra_bytes": r["extra_bytes"], "recall": recall})
    return rows


def print_search(rows: list[dict], n: int, k: int) -> None:
    print(f"\n## All-vs-all exact top-{k} search, N = {n:,} (itself excluded)\n")
    print("Seconds: best and median of the interleaved repeats; memory: the largest peak above the loaded data.\n")
    print(f"| d | method | best s | median s | peak extra memory | speed vs faiss | top-{k} recall vs ours fp32 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        faiss = next((x["seconds"] for x in rows if x["d"] == r["d"] and x["method"].startswith("faiss")), None)
        ratio = f"{faiss / r['seconds']:.2f}x" if faiss else "—"
        recall = f"{r['recall']:.4f}" if r["recall"] is not None else "—"
        print(f"| {r['d']} | {r['method']} | {r['seconds']:.2f} | {r['median']:.2f} | {r['extra_bytes'] / 2**20:,.0f} MiB | {ratio} | {recall} |")


# ------------------------------------------------------------------------------------------ name search

def name_queries(names: dict[str, str], typed: int, seed: int = 0) -> list[str]:
    """What the explorer searches while someone types: every prefix of ``typed`` real names, a keystroke at a time."""
    picked = random.Random(seed).sample(sorted(names.values()), min(typed, len(names)))
    return [name[:i] for name in picked for i in range(1, len(name) + 1)]


def bench_names(args) -> dict:
    from bannermatch.explorer import MAX_SUGGESTIONS
    from bannermatch.steam import NameIndex, load_app_names, normalize_name

    names = load_app_names(args.app_list)
    start = time.perf_counter()
    index = NameIndex(names)
    build = time.perf_counter() - start
    queries = name_queries(names, args.typed_names)
    means, p99s = [], []
    for rep in range(args.repeats):
        normalize_name.cache_clear()  # every repeat normalises its queries afresh, as new keystrokes would be
        seconds = []
        for q in queries:
            start = time.perf_counter()
            index.search(q, MAX_SUGGESTIONS)
            seconds.append(time.perf_counter() - start)
        means.append(statistics.fmean(seconds))
        p99s.append(statistics.quantiles(seconds, n=100)[98] if len(seconds) > 1 else seconds[0])
        print(f"  [names repeat {rep + 1}/{args.repeats}] {means[-1] * 1e3:.3f} ms per query", file=sys.stderr)
    return {"names": len(names), "queries": len(queries), "typed": args.typed_names, "build": build,
            "best": min(means), "median": statistics.median(means), "p99": min(p99s)}


def print_names(r: dict) -> None:
    print(f"\n## Game name search (the explorer's suggestions), {r['names']:,} real Steam names\n")
    print(f"{r['queries']:,} queries (every prefix of {r['typed']} real names, as typed), top-12 each, "
          f"on an index built once in {r['build'] * 1e3:.0f} ms.\n")
    print("Mean of each repeat (best and median), and the 99th percentile of single queries (best repeat's).\n")
    print("| ms per query, best | ms per query, median | 99th percentile, ms |")
    print("|---:|---:|---:|")
    print(f"| {r['best'] * 1e3:.3f} | {r['median'] * 1e3:.3f} | {r['p99'] * 1e3:.3f} |")


# ------------------------------------------------------------------------------------------ main

def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import timm

    try:
        import faiss
        faiss_version = faiss.__version__
    except ImportError:  # the GPU machine has none; only the CPU search comparison needs it
        faiss_version = "none"
    mem = resource.getpagesize() * __import__("os").sysconf("SC_PHYS_PAGES") / 2**30
    load = " ".join(f"{x:.2f}" for x in __import__("os").getloadavg())
    return (f"{cpu}, {__import__('os').cpu_count()} cores, {mem:.0f} GiB; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), timm {timm.__version__}, faiss {faiss_version}, "
            f"numpy {np.__version__}, Python {platform.python_version()}; CUDA: {torch.cuda.is_available()}; "
            f"load average at start: {load}")


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384, help="300x450 JPEG banners (cut from real photos) to embed (default 384)")
    p.add_argument("--baseline-images", type=int, default=64,
                   help="how many of them the slow original-style pipeline embeds (its rate is per image; default 64)")
    p.add_argument("--at-scale-images", type=int, default=30_000,
                   help="distinct banners embedded end to end with every default by --only at-scale (default 30000)")
    p.add_argument("--models", type=_csv(str), default=["vits16"], help="comma list of: vits16, vitb16, vits8 (default vits16)")
    p.add_argument("--batch-size", type=int, help="default: the library's (about 4,096 tokens on a CPU)")
    p.add_argument("--workers", type=_csv(int), default=[0, 2], help="DataLoader worker counts to compare (default 0,2)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each embedding pipeline (default 2)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="the embedding part's clock: wall (default), or cpu, this process's CPU time, for a machine "
                        "shared with other jobs (with --workers 0: decoding processes' time is not counted)")
    p.add_argument("--threads", type=int, help="torch's threads (default: one a core)")
    p.add_argument("--decode-images", type=int, default=120,
                   help="JPEGs per source size for the decode ceiling (cut from real photos; default 120)")
    p.add_argument("--cpu-images", type=int, default=60,
                   help="images each CPU option embeds per repeat for its speed (default 60)")
    p.add_argument("--calibration-images", type=int, default=30,
                   help="images calibrating static int8 (other than the evaluated ones; default 30)")
    p.add_argument("--device", default="cuda", help="the gpu part's device (default cuda; cpu runs the same code)")
    p.add_argument("--gpu-images", type=int, default=4096,
                   help="300x450 JPEGs (cut from real photos) the gpu part decodes and embeds (default 4096)")
    p.add_argument("--gpu-batches", type=_csv(int), default=[64, 128, 256],
                   help="batch sizes of the gpu part's model-only rows (default 64,128,256)")
    p.add_argument("--search-n", type=int, default=30_000, help="database size for the search benchmark (30000)")
    p.add_argument("--dims", type=_csv(int), default=[768, 1536], help="feature dimensions to search (768,1536)")
    p.add_argument("--search-methods", type=lambda s: s.split(","), default=list(SEARCH_METHODS),
                   help="comma list of: " + ", ".join(SEARCH_METHODS))
    p.add_argument("--search-repeats", type=int, default=2, help="interleaved repeats of each search (default 2)")
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--scaling-n", type=_csv(int), default=[30_000, 100_000, 300_000],
                   help="collection sizes of the scaling part (default 30000,100000,300000)")
    p.add_argument("--scaling-dim", type=int, default=768, help="feature dimension of the scaling part (768)")
    p.add_argument("--scaling-fp32-max", type=int, default=100_000,
                   help="largest N the scaling part also searches in fp32 (default 100000; bf16 runs at every N)")
    p.add_argument("--scaling-search-max", type=int, default=1_000_000,
                   help="largest N the scaling part searches at all (and runs the reports that read the matches)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile (compiling included end to end; default on)")
    p.add_argument("--app-list", type=Path, default=_test_fixtures().SHARED_APPS,
                   help="Steam app list for the name search (default: the shared 2021 list, ../shared/steam/...)")
    p.add_argument("--typed-names", type=int, default=100,
                   help="real names typed, a prefix per keystroke, for the name search (default 100)")
    p.add_argument("--skip-embedding", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--skip-names", action="store_true")
    p.add_argument("--only", choices=PARTS, help="run this part alone (cpu-options, gpu and scaling run only so: one "
                   "needs the real-weights test dependencies, onnxruntime, openvino and nncf, one a GPU, and scaling "
                   "an hour or more on 2 cores)")
    p.add_argument("--search-worker", nargs=4, metavar=("METHOD", "FEATURES", "K", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.search_worker:
        method, features_file, k, out = args.search_worker
        search_worker(method, features_file, int(k), out)
        return 0
    if args.clock == "cpu" and any(args.workers):
        build_parser().error("--clock cpu counts this process only: use it with --workers 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.models if m not in MODELS] + [m for m in args.search_methods if m not in SEARCH_METHODS]
    if unknown:
        build_parser().error(f"unknown model or search method: {', '.join(unknown)}")
    skip = {part: (part in OPT_IN_PARTS and args.only != part) or getattr(args, f"skip_{part}", False)
            or (args.only is not None and args.only != part) for part in PARTS}
    if not skip["names"] and not args.app_list.is_file():
        if args.only == "names" or args.app_list != build_parser().get_default("app_list"):
            build_parser().error(f"no app list at {args.app_list}")
        print(f"(name search skipped: no app list at {args.app_list}; pass --app-list)", file=sys.stderr)
        skip["names"] = True
    print(f"# bannermatch benchmarks, {datetime.date.today().isoformat()}\n")
    print(f"Machine: {_machine()}")
    print(f"Command: python -m benchmarks {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    with tempfile.TemporaryDirectory() as tmp:
        if not skip["embedding"]:
            print_embedding(bench_embedding(args, Path(tmp)))
        if not skip["at-scale"]:
            print_at_scale(bench_at_scale(args, Path(tmp)))
        if not skip["decode"]:
            print_decode(bench_decode(args, Path(tmp)))
        if not skip["cpu-options"]:
            from benchmarks.cpu_options import bench_cpu_options, print_cpu_options

            print_cpu_options(bench_cpu_options(args, Path(tmp)))
        if not skip["gpu"]:
            from benchmarks.gpu import bench_gpu, print_gpu

            print_gpu(bench_gpu(args, Path(tmp)), args.search_n, args.k)
        if not skip["search"]:
            print_search(bench_search(args, Path(tmp)), args.search_n, args.k)
        if not skip["names"]:
            print_names(bench_names(args))
        if not skip["scaling"]:
            from benchmarks.scaling import bench_scaling

            bench_scaling(args, Path(tmp))  # prints each N's rows as they are measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
