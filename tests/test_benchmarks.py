"""Smoke test of the benchmark command at toy sizes: it runs end to end and prints every row of its tables.

No timing assertions: the speed targets are read from the benchmark's own output, not enforced here.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from bannermatch.recipe import resolve_dtype
from benchmarks.run import SEARCH_METHODS, clustered_features, main, name_queries


def test_benchmark_prints_embedding_and_search_tables(capsys):
    main(["--images", "6", "--baseline-images", "2", "--batch-size", "3", "--workers", "0,1", "--repeats", "1",
          "--search-n", "300", "--dims", "16", "--search-repeats", "1", "-k", "5", "--decode-images", "4"])
    out = capsys.readouterr().out
    assert "Machine:" in out and "Command: python -m benchmarks --images 6" in out
    embedding = [line for line in out.splitlines() if line.startswith("| dino_vits16 |")]
    pipelines = [line.split("|")[2].strip() for line in embedding]
    assert pipelines[0].startswith("original-style")
    ours = [p for p in pipelines if p.startswith("bannermatch extract_features")]
    assert [re.search(r"batch 3, workers=(\d)(, compile=True)?\)$", p).groups() for p in ours] == [
        ("0", None), ("1", None), ("0", ", compile=True")]
    assert any(p.startswith("model only") and p.endswith("compiled)") for p in pipelines)
    assert any(p.startswith("model only (float32") for p in pipelines)
    for line in embedding:  # every rate is a positive number, every ratio is printed
        best, median = (float(x) for x in line.split("|")[3:5])
        assert best > 0 and median > 0
    assert embedding[0].split("|")[5].strip() == "1.00x"
    dtype = resolve_dtype("auto", torch.device("cpu"))
    assert pipelines[3] == f"model only ({dtype}, batch 3, fused attention)"  # the weights in the working precision
    assert (f"model only ({dtype} autocast over float32 weights, batch 3, fused attention)" in pipelines) == (
        dtype != "float32")  # the way before, beside it
    summary = re.search(r"dino_vits16, ([\d.]+) GFLOP an image: end to end \(workers=0\) [\d.]+ img/s, [\d.]+x the "
                        r"original-style loop, \d+% of the model alone in the same precision \((\w+), [\d.]+ img/s\)\. "
                        r"The model alone computes \d+ GFLOP/s: \d+% of the (\w+) GEMM ceiling measured in the same run "
                        r"\(\d+ GFLOP/s; float32 \d+ GFLOP/s\)\.", out)
    assert summary and 9 < float(summary[1]) < 9.6 and summary[2] == summary[3] == dtype  # ViT-S/16: 4.6 GMAC
    assert re.search(r"torch\.compile: [\d.]+ s on the first batch, then [\d.]+ img/s \([\d.]+x the eager model "
                     r"alone\): (pays from [\d,]+ images|never pays)", out)

    decode = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if re.match(r"\| \d+x\d+ JPEG", line)]
    assert [(d[0].split(",")[0], d[1]) for d in decode] == [
        (f"{size} JPEG ({source})", f"{how}, {where}") for size, source in (
            ("300x450", "Steam CDN banner"), ("600x900", "CDN original"), ("224x336", "snapshot"))
        for how in ("full decode", "draft (size hint)") for where in ("main process", "2 workers")]
    assert all(float(d[2]) > 0 and d[6] in ("decode", "model") for d in decode)
    assert "Model alone: model only (dino_vits16), float32, batch 3:" in out

    search = [line for line in out.splitlines() if re.match(r"\| 16 \|", line)]  # one size: each method is a process
    assert [(line.split("|")[1].strip(), line.split("|")[2].strip()) for line in search] == [
        ("16", m) for m in SEARCH_METHODS]
    for line in search:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[2]) <= float(cells[3]) and cells[4].endswith("MiB")
        # every exact method finds the same top-5 as ours fp32; bf16 rescoring keeps it at least nearly so
        assert float(cells[6]) >= (0.9 if "bf16" in cells[1] else 0.999)


def test_gpu_part_runs_its_code_on_a_cpu(capsys, monkeypatch):
    """The GPU benchmark is prepared for a lent GPU; on a CPU the same code runs and prints every row."""
    from bannermatch import extraction

    monkeypatch.setattr(extraction, "_usable_cpus", lambda: 2)  # its rows name counts of cores
    main(["--only", "gpu", "--device", "cpu", "--gpu-images", "8", "--gpu-batches", "4", "--batch-size", "4",
          "--repeats", "1", "--search-n", "300", "--dims", "16", "--search-repeats", "1", "-k", "5"])
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| dino_vits16 |")]
    dtype = resolve_dtype("auto", torch.device("cpu"))  # the working precision, the weights cast to it
    autocast = [("model only", f"{dtype} autocast over float32 weights, batch 4, fused attention")]
    assert [(r[1], r[2]) for r in rows] == [
        ("model only", f"{dtype}, batch 4, fused attention"), ("model only", f"{dtype}, batch 4, plain attention"),
        *(autocast if dtype != "float32" else []),
        ("decode only", "main process"), ("decode only", "1 process"), ("decode only", "2 processes"),
        ("end to end", f"{dtype}, batch 4, decoding processes as measured"),
        ("end to end", f"{dtype}, batch 4, main process"), ("end to end", f"{dtype}, batch 4, 1 decoding process"),
        ("end to end", f"{dtype}, batch 4, 2 decoding processes"),
        ("end to end", f"{dtype}, batch 4, decoding processes as measured, 2 images")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert re.search(r"dino_vits16: end to end with the measured decoding processes [\d.]+ img/s, [\d.]+ img/s past "
                     r"the fixed costs: \d+% of the slower .*: bound by the model\.", out)
    search = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| 16 |")]
    assert [s[1] for s in search] == ["float32", "bfloat16"] and float(search[1][4]) >= 0.9
    assert "## Embedding throughput" not in out and "All-vs-all exact" not in out  # the other parts stay off


def test_benchmark_photos_are_distinct_files():
    """The store embeds a picture once, however many files hold it: repeated files would be counted as embedded."""
    import hashlib

    from benchmarks.run import photo_jpegs

    blobs = photo_jpegs((300, 450), 64)
    assert len({hashlib.sha256(b).digest() for b in blobs}) == 64


def test_at_scale_part_embeds_every_banner_with_the_library_defaults(capsys):
    """--only at-scale: extract_features on distinct photo banners with every default, the original loop's rate
    beside it, and the library's compile decision quoted (too few banners here: not compiling)."""
    from bannermatch.extraction import COMPILE_GAINS

    main(["--only", "at-scale", "--at-scale-images", "64", "--baseline-images", "3"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("bannermatch extract_features:"))
    rate, ratio = float(line.split()[2]), float(line.split("**")[1].rstrip("x"))
    assert rate > 0 and ratio > 0 and "64 distinct photo banners, every default" in out
    said = line.split("The library said: ")[1]
    if ("cpu", resolve_dtype("auto", torch.device("cpu"))) in COMPILE_GAINS:  # decided after 3 batches of 20
        assert said.startswith("torch.compile pays from about") and said.endswith(" 4 left: not compiling")
    else:
        assert said == "nothing about compiling"


def test_clustered_features_are_unit_vectors_with_close_neighbours():
    x = clustered_features(400, 32, seed=3)
    assert x.shape == (400, 32) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    random_pairs = sims[np.triu_indices(400, 1)]
    assert np.median(sims.max(1)) > np.percentile(random_pairs, 99)  # each has a neighbour from its own cluster
    assert np.array_equal(x, clustered_features(400, 32, seed=3))


def test_name_search_benchmark_runs_alone_over_the_real_names(capsys, steam_names):
    main(["--only", "names", "--typed-names", "7", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "## Embedding" not in out and "## All-vs-all" not in out
    queries = name_queries(steam_names, 7)
    assert sum(len(q) == 1 for q in queries) == 7  # one keystroke of each typed name after another
    assert f"{len(steam_names):,} real Steam names" in out and f"{len(queries):,} queries (every prefix of 7 real names" in out
    row = [line for line in out.splitlines() if re.match(r"\| [0-9.]+ \|", line)]
    best, median, p99 = (float(x) for x in row[0].split("|")[1:4])
    assert 0 < best <= median and p99 > 0


def test_scaling_part_measures_every_stage_through_the_library(capsys, steam_names):
    main(["--only", "scaling", "--scaling-n", "400,500", "--scaling-dim", "16", "--scaling-fp32-max", "400",
          "--scaling-search-max", "400", "--search-repeats", "1", "-k", "5", "--typed-names", "3"])
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if re.match(r"\| [45]00 \|", line)]
    assert [(r[0], r[1]) for r in rows] == [("400", s) for s in (
        "store write (float16 segments)", "store open + load", "exact search bfloat16", "exact search float32",
        "exact search bfloat16, near-copies (cosine 0.98)", "faiss HNSW build + query", "unique banners (from the matches)",
        "duplicates at cosine 0.9 (from the matches)",
        "issues (measures cached)", "gallery of every banner (CDN links)", "explorer name search")] + [
        ("500", s) for s in ("store write (float16 segments)", "store open + load", "issues (measures cached)",
                             "explorer name search")]  # 500 > --scaling-search-max: no search, nor its reports
    notes = {r[1]: r[5] for r in rows if r[0] == "400"}
    assert re.search(r"search at \d+% of their rate .*index for index 1\.0+; recall@5 vs fp32 1\.0+$",
                     notes["exact search bfloat16"])
    assert re.search(r"fp32 search [\d.]+ s; rows equal to fp32 index for index 1\.0+$",
                     notes["exact search bfloat16, near-copies (cosine 0.98)"])
    assert re.search(r"recall@5 vs exact fp32 (0\.9\d+|1\.0+)$", notes["faiss HNSW build + query"])
    assert re.match(r"\d+ duplicate groups \((\d+) of identical pixels\)", notes["duplicates at cosine 0.9 (from the matches)"])
