"""The GPU path (``python -m benchmarks --only gpu``): where an end-to-end run's time goes beside a GPU.

For each model, on ``--device`` (cuda by default; the tests run the same code on a CPU), interleaved:
the model alone in the ``auto`` precision at each ``--gpu-batches`` size with the fused and the plain attention
kernel; decoding alone (extraction's decode + resize of 300x450 JPEGs cut from real photos) in the main
process and with half and all of the cores; and end to end with ``extract_features`` on those JPEGs, with the
decoding processes its own measurement picks and with each fixed count. Then the all-vs-all top-k search of
``--search-n`` vectors on the device, fp32 and bf16. Every timed call ends with the device synchronised.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _synced(fn, device: torch.device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def _processes(w: int, what: str = "") -> str:
    return "main process" if not w else f"{w} {what}process{'es' if w > 1 else ''}"


def bench_gpu(args, tmp: Path) -> dict:
    from benchmarks.run import (MODELS, _DecodeDataset, _interleaved, _with_attention, autocast_model_only,
                                clustered_features, decoder, model_only, photo_jpegs, random_checkpoint)
    from bannermatch.extraction import _usable_cpus, extract_features, load_backbone
    from bannermatch.recipe import default_batch_size, make_recipe, resolve_dtype
    from bannermatch.search import top_k_all_pairs

    device = torch.device(args.device)
    cpus = _usable_cpus()
    blobs = photo_jpegs((300, 450), args.gpu_images)
    folder = tmp / "gpu_banners"
    folder.mkdir()
    for i, blob in enumerate(blobs):
        (folder / f"{100000 + i}.jpg").write_bytes(blob)
    counts = sorted({0, cpus // 2, cpus})
    rows = []
    for short in args.models:
        model = MODELS[short]
        weights = random_checkpoint(model, tmp)
        recipe = make_recipe(model, weights=weights)
        dtype = resolve_dtype("auto", device)
        backbone = load_backbone(recipe, weights, device, dtype)
        batch = args.batch_size or default_batch_size(recipe, device)
        n, quarter = len(blobs), max(1, len(blobs) // 4)
        runs = {}
        for size in args.gpu_batches:
            for fused in (True, False):
                def alone(count, size=size, fused=fused):
                    _with_attention(backbone, fused, lambda: model_only(backbone, recipe, size, count, device))
                alone(size)  # the first call's set-up stays out of the timing
                runs[("model only", f"{dtype}, batch {size}, {'fused' if fused else 'plain'} attention")] = (
                    n, _synced(lambda alone=alone: alone(n), device))
        if dtype != "float32":  # the weights cast against the way before them: autocast over float32 weights
            fp32, size = load_backbone(recipe, weights, device), args.gpu_batches[0]

            def autocast(count, fp32=fp32, size=size):
                autocast_model_only(fp32, recipe, size, count, dtype, device)
            autocast(size)
            runs[("model only", f"{dtype} autocast over float32 weights, batch {size}, fused attention")] = (
                n, _synced(lambda autocast=autocast: autocast(n), device))
        dataset = _DecodeDataset(blobs, recipe, hint=True)
        for w in counts:
            runs[("decode only", _processes(w))] = (n, decoder(dataset, w, batch))
        for w in (None, *counts):
            label = "decoding processes as measured" if w is None else _processes(w, "decoding ")
            runs[("end to end", f"{dtype}, batch {batch}, {label}")] = (n, lambda w=w: extract_features(
                folder, recipe, tempfile.mkdtemp(dir=tmp), weights, args.device, batch, w, progress=False))
        runs[("end to end", f"{dtype}, batch {batch}, decoding processes as measured, {quarter} images")] = (
            quarter, lambda: extract_features(folder, recipe, tempfile.mkdtemp(dir=tmp), weights, args.device, batch,
                                              progress=False, limit=quarter))
        rates = _interleaved(runs, args.repeats, f"gpu {short}")
        rows += [{"model": model, "part": part, "setting": setting, "best": max(r), "median": statistics.median(r)}
                 for (part, setting), r in rates.items()]
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()

    searches = []
    for d in args.dims:
        x = clustered_features(args.search_n, d)
        found = {}
        for precision in ("float32", "bfloat16"):
            top_k_all_pairs(x[:256], args.k, args.device, precision)  # kernels loaded outside the timing
            seconds = []
            for _ in range(args.search_repeats):
                start = time.perf_counter()
                found[precision], _ = top_k_all_pairs(x, args.k, args.device, precision)  # numpy out: synchronised
                seconds.append(time.perf_counter() - start)
            searches.append({"d": d, "precision": precision, "best": min(seconds),
                             "median": statistics.median(seconds)})
        hits = sum(len(set(a) & set(b)) for a, b in zip(found["bfloat16"], found["float32"]))
        searches[-1]["recall"] = hits / found["float32"].size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"rows": rows, "searches": searches, "device": name, "cpus": cpus, "images": len(blobs),
            "quarter": max(1, len(blobs) // 4)}


def print_gpu(r: dict, n: int, k: int) -> None:
    print(f"\n## The GPU path on {r['device']}, {r['cpus']} usable CPU cores, {r['images']} 300x450 JPEGs "
          "(images/s; best and median)\n")
    print("| model | part | setting | best img/s | median img/s | vs model only (best) |")
    print("|---|---|---|---:|---:|---:|")
    for model in dict.fromkeys(x["model"] for x in r["rows"]):
        mine = [x for x in r["rows"] if x["model"] == model]
        ceiling = max(x["best"] for x in mine if x["part"] == "model only")
        for x in mine:
            print(f"| {model} | {x['part']} | {x['setting']} | {x['best']:.1f} | {x['median']:.1f} | "
                  f"{x['best'] / ceiling:.0%} |")
        decode = max(x["best"] for x in mine if x["part"] == "decode only")
        measured = next(x["best"] for x in mine if x["setting"].endswith("as measured"))
        quarter = next(x["best"] for x in mine if x["setting"].endswith(f"{r['quarter']} images"))
        # a run's fixed costs (building the model, starting processes) weigh on a short run: the rate of the
        # last three quarters, from the whole run's time less the quarter run's, is the steady one
        rest = r["images"] / measured - r["quarter"] / quarter
        steady = (r["images"] - r["quarter"]) / rest if rest > 0 else measured  # noise can invert short runs
        print(f"\n{model}: end to end with the measured decoding processes {measured:.1f} img/s, "
              f"{steady:.1f} img/s past the fixed costs: {steady / min(decode, ceiling):.0%} of the slower of the "
              f"model alone ({ceiling:.1f}) and the best decoding ({decode:.1f}): bound by "
              f"{'decoding' if decode < ceiling else 'the model'}.\n")
    print(f"All-vs-all top-{k}, N = {n:,}, on the device (seconds; bf16's recall against fp32's lists):\n")
    print("| d | precision | best s | median s | top-k recall vs fp32 |")
    print("|---:|---|---:|---:|---:|")
    for s in r["searches"]:
        recall = f"{s['recall']:.4f}" if "recall" in s else "—"
        print(f"| {s['d']} | {s['precision']} | {s['best']:.3f} | {s['median']:.3f} | {recall} |")
