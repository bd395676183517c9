"""How each stage grows with the collection: N = 30k, 100k, 300k banners (``--only scaling``).

Synthetic features (clustered unit vectors, ``--scaling-dim``, default 768: ViT-B) written as a real feature store
(float16 segments, a manifest, cached image measures), then the library's own calls on it: opening and loading
the store, the exact all-pairs search in fp32 and bf16 beside the products alone (the same tiles, in the same run:
the share of the GEMM rate the search keeps), faiss HNSW (build + query, recall@10 against exact), what
duplicates/unique/issues do beyond the search, writing the gallery of every banner (CDN links: no thumbnails),
and the explorer's name search over N names. Embedding is N images at the model's rate: see the embedding part.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.run import _loadavg, _peak_rss_bytes, _reset_peak_rss, _rss_bytes, clustered_features, name_queries

SEGMENT_ROWS = 10_000


def _timed(fn):
    """``(result, seconds, peak resident memory above the start)``."""
    _reset_peak_rss()
    before = _rss_bytes()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, max(0, _peak_rss_bytes() - before)


def write_store(folder: Path, features: np.ndarray, names: dict[str, str]):
    """A feature store holding ``features`` as the ``simple`` view (the last block's CLS token) of ViT-B/16, with
    the image measures duplicates and issues read already cached (no banner files exist)."""
    from bannermatch import make_recipe
    from bannermatch.reports.measures import _STATS_VERSION, STATS_FILE
    from bannermatch.store import FeatureStore

    recipe = make_recipe("dino_vitb16")
    store = FeatureStore.open(folder, recipe, create=True)
    keys = list(names)
    digests = [f"{i:016x}" for i in range(len(keys))]
    for start in range(0, len(keys), SEGMENT_ROWS):
        rows = slice(start, start + SEGMENT_ROWS)
        block = features[rows]
        store.add_segment(list(zip(keys[rows], digests[rows])),
                          {"cls": block[:, None, :], "mean": block, "gem": block}, {"blocks": 1}, {}, {})
    store.record({}, {}, {"entries": [[k, d] for k, d in zip(keys, digests)], "names": names, "images": ""})
    store.add_view(recipe)
    rng = np.random.default_rng(0)
    measures = {d: {"pixels": f"{i % (len(keys) - 50):016x}", "width": 600, "height": 900,  # 50 repeated pictures
                    "bright99": float(rng.uniform(0.1, 1)), "bright5": float(rng.uniform(0, 0.9)),
                    "laplacian": float(rng.uniform(5, 800)), "entropy": float(rng.uniform(1, 8)),
                    "chroma": float(rng.uniform(0, 200)),
                    "phash": rng.bytes(8).hex()} for i, d in enumerate(digests)}
    (folder / STATS_FILE).write_text(json.dumps({"version": _STATS_VERSION, "measures": measures}))
    return recipe


def synthetic_names(real: dict[str, str], n: int) -> dict[str, str]:
    """``n`` app ids with names: the real ones, then the real ones again with a sequel number (as Steam's later
    games are named), so prefix and substring searches meet as many candidates as a real list of that size."""
    base = list(real.values())
    return {str(10 + i): base[i % len(base)] + ("" if i < len(base) else f" {i // len(base) + 1}") for i in range(n)}


def _products_alone(x: torch.Tensor, x_search: torch.Tensor) -> None:
    """The all-pairs search's products and nothing else: the same tiles into the same kind of buffer."""
    from bannermatch.search import _blocks, _similarities, _tile_size

    buffer = torch.empty(_tile_size(len(x), x_search.element_size()), dtype=x_search.dtype)
    for start, stop, tiles in _blocks(len(x), x_search.element_size()):
        for col, end in tiles:
            _similarities(x[start:stop], x_search[col:end], buffer)


def bench_search_scaling(x: np.ndarray, k: int, repeats: int, fp32: bool) -> tuple[list[dict], dict]:
    """Exact search against its products alone, interleaved ``repeats`` times: rows, and each precision's
    ``(neighbours, scores)``."""
    from bannermatch.search import top_k_all_pairs

    t = torch.from_numpy(x)
    runs = {"bfloat16": t.to(torch.bfloat16)} | ({"float32": t} if fp32 else {})
    found, rows = {}, []
    for precision, x_search in runs.items():
        seconds = {"products alone": [], "search": []}
        peak = 0
        for rep in range(repeats):
            seconds["products alone"].append(_timed(lambda: _products_alone(t, x_search))[1])
            found[precision], s, mem = _timed(lambda: top_k_all_pairs(x, k, "cpu", precision))
            seconds["search"].append(s)
            peak = max(peak, mem)
            print(f"  [scaling N={len(x):,} {precision} repeat {rep + 1}/{repeats}] products "
                  f"{seconds['products alone'][-1]:.1f} s, search {s:.1f} s (load {_loadavg()})", file=sys.stderr)
        ratios = [g / s for g, s in zip(seconds["products alone"], seconds["search"])]
        gflops = len(x) ** 2 * x.shape[1] / min(seconds["products alone"]) / 1e9  # N^2/2 pairs, 2d flops each
        rows.append({"stage": f"exact search {precision}", "seconds": min(seconds["search"]),
                     "median": statistics.median(seconds["search"]), "memory": peak,
                     "note": f"products alone {min(seconds['products alone']):.1f} s ({gflops:,.0f} GFLOP/s); "
                             f"search at {max(ratios):.0%} of their rate (median {statistics.median(ratios):.0%})"})
    return rows, found


def bench_near_copies(n: int, d: int, k: int) -> dict:
    """The exact search where bf16 cannot rank (series of near-copies): bf16 against fp32, one run each."""
    from bannermatch.search import top_k_all_pairs

    x = clustered_features(n, d, series=50, spread=0.15)
    (idx, _), bf16, mem = _timed(lambda: top_k_all_pairs(x, k, "cpu", "bfloat16"))
    (exact, _), fp32, _ = _timed(lambda: top_k_all_pairs(x, k, "cpu", "float32"))
    return {"stage": "exact search bfloat16, near-copies (cosine 0.98)", "seconds": bf16, "memory": mem,
            "note": f"fp32 search {fp32:.1f} s; rows equal to fp32 index for index {np.mean((idx == exact).all(1)):.4f}"}


def _searches_and_reports(fs, n: int, args, tmp: Path) -> list[dict]:
    """The exact and approximate searches, then what the reports do with the matches beyond them."""
    from bannermatch.gallery import write_gallery
    from bannermatch.matches import Matches
    from bannermatch.reports import find_duplicates, find_issues, find_unique
    from bannermatch.search import top_k_faiss

    rows, found = bench_search_scaling(fs.features, args.k, args.search_repeats, n <= args.scaling_fp32_max)
    exact = found.get("float32", found["bfloat16"])[0]
    if "float32" in found:
        same = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found["bfloat16"][0], exact)])
        rows[-2]["note"] += (f"; rows equal to fp32 index for index {np.mean((found['bfloat16'][0] == exact).all(1)):.4f}"
                             f"; recall@{args.k} vs fp32 {same:.4f}")
        if n == min(args.scaling_n) and n <= 30_000:  # bf16 settles every row there: fp32's N^2, without symmetry
            rows.append(bench_near_copies(n, args.scaling_dim, args.k))
    (approx, _), seconds, mem = _timed(lambda: top_k_faiss(fs.features, fs.features, args.k, np.arange(n), True))
    recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(approx, exact)])
    rows.append({"stage": "faiss HNSW build + query", "seconds": seconds, "memory": mem,
                 "note": f"recall@{args.k} vs exact {'fp32' if 'float32' in found else 'bf16'} {recall:.4f}"})
    matches = Matches(fs, *found.get("float32", found["bfloat16"]), "float32", "torch")
    for stage, fn in (("unique banners (from the matches)", lambda: find_unique(fs, matches=matches)),
                      ("duplicates at cosine 0.9 (from the matches)",
                       lambda: find_duplicates(fs, 0.9, matches=matches, progress=False)),
                      ("issues (measures cached)", lambda: find_issues(fs, progress=False))):
        result, seconds, mem = _timed(fn)
        rows.append({"stage": stage, "seconds": seconds, "memory": mem, "note": result.summary()[:90]})
    _, seconds, mem = _timed(lambda: write_gallery(fs, "all", tmp / f"gallery_{n}", k=args.k, images="cdn",
                                                   matches=matches, progress=False))
    rows.append({"stage": "gallery of every banner (CDN links)", "seconds": seconds, "memory": mem,
                 "note": f"{n:,} pages"})
    return rows


def bench_scaling_n(n: int, args, tmp: Path, real_names: dict[str, str]) -> list[dict]:
    from bannermatch import load_features
    from bannermatch.explorer import MAX_SUGGESTIONS
    from bannermatch.reports import find_issues
    from bannermatch.steam import NameIndex, normalize_name

    folder = tmp / f"store_{n}"
    names = synthetic_names(real_names, n)
    recipe, seconds, _ = _timed(lambda: write_store(folder, clustered_features(n, args.scaling_dim), names))
    rows = [{"stage": "store write (float16 segments)", "seconds": seconds, "note": ""}]
    fs, seconds, mem = _timed(lambda: load_features(folder, recipe))
    rows.append({"stage": "store open + load", "seconds": seconds, "memory": mem,
                 "note": f"features {fs.features.nbytes / 2**20:,.0f} MiB"})
    if n <= args.scaling_search_max:
        rows += _searches_and_reports(fs, n, args, tmp)
    else:
        _, seconds, mem = _timed(lambda: find_issues(fs, progress=False))
        rows.append({"stage": "issues (measures cached)", "seconds": seconds, "memory": mem, "note": ""})
    index, seconds, _ = _timed(lambda: NameIndex(fs.names))
    queries = name_queries(real_names, args.typed_names)
    normalize_name.cache_clear()
    start = time.perf_counter()
    for q in queries:
        index.search(q, MAX_SUGGESTIONS)
    per_query = (time.perf_counter() - start) / len(queries)
    rows.append({"stage": "explorer name search", "seconds": per_query,
                 "note": f"per query ({len(queries):,} typed prefixes); index built in {seconds:.2f} s"})
    for r in rows:
        r["n"] = n
    print_scaling(rows)
    return rows


def bench_scaling(args, tmp: Path) -> list[dict]:
    from bannermatch.steam import load_app_names

    real = load_app_names(args.app_list)
    print(f"\n## Scaling: each stage at N = {', '.join(f'{n:,}' for n in args.scaling_n)} "
          f"(d = {args.scaling_dim}, top-{args.k})\n")
    print("Seconds: best of the interleaved repeats (search) or one run; memory: peak resident above the start.\n")
    print("| N | stage | seconds | median s | peak extra memory | note |")
    print("|---:|---|---:|---:|---:|---|", flush=True)
    rows = []
    for n in args.scaling_n:
        rows += bench_scaling_n(n, args, tmp / f"n{n}", real)
    return rows


def print_scaling(rows: list[dict]) -> None:
    for r in rows:
        median = f"{r['median']:.2f}" if "median" in r else "—"
        memory = f"{r['memory'] / 2**20:,.0f} MiB" if "memory" in r else "—"
        seconds = f"{r['seconds'] * 1e3:.2f} ms" if r["stage"] == "explorer name search" else f"{r['seconds']:.2f}"
        print(f"| {r['n']:,} | {r['stage']} | {seconds} | {median} | {memory} | {r['note']} |", flush=True)
