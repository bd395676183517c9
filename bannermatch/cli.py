"""The ``bannermatch`` command line: the notebook steps, one subcommand each."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .defaults import DATA_DIR, DEFAULT_IMAGES, DEFAULT_STORE
from .errors import BannermatchError
from .recipe import DTYPES
from .steam import STEAM_CDN

log = logging.getLogger("bannermatch")

EXAMPLE_QUERY = "227300"  # Euro Truck Simulator 2, the original write-up's query
DEFAULT_GRID = f"{DATA_DIR}/matches.png"  # `run`'s grid; its folder is made when missing


# ------------------------------------------------------------------------------------------ shared options

def _arch(text: str) -> dict:
    """``depth=2,embed_dim=48`` -> {"depth": 2, "embed_dim": 48}; sizes are numbers."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item.strip()}: an architecture size is a number") from None
        out[key.strip()] = int(number) if number.is_integer() else number
    return out


def _folder(text: str) -> str:
    """A folder we may write into: it, or its nearest existing parent (it is created), is no file."""
    path = Path(text)
    existing = next(p for p in [path, *path.parents] if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, not a folder")
    return text


def _new_file(text: str) -> str:
    """A file we will write: checked before any work, so a long run never fails at its last step."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; name a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path.parent} to write {path.name} into; create it first")
    return text


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    from .backbones import SOURCES, list_models
    from .recipe import PREPROCESSING, STRATEGIES

    g = p.add_argument_group("feature recipe")
    g.add_argument("--model", default="dino_vitb16", choices=[m.name for m in list_models()], metavar="NAME",
                   help="backbone (see `bannermatch models`; default: %(default)s)")
    g.add_argument("--source", choices=SOURCES, help="where the model comes from (default: the model's first)")
    g.add_argument("--weights", metavar="PATH", help="local weights (.pth/.safetensors, or a HF folder) for offline use")
    g.add_argument("--strategy", default="simple", choices=STRATEGIES, help="feature strategy (default: %(default)s)")
    g.add_argument("--multiscale", action="store_true", help="average features over scales 1, 1/sqrt(2), 1/2")
    g.add_argument("--preprocess", default="crop", choices=PREPROCESSING, help="crop, squash or keep the 2:3 shape (default: %(default)s)")
    g.add_argument("--n-last-blocks", type=int, help="`complex`: CLS tokens of this many last blocks (1-4)")
    g.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=None, help="`complex`: add the mean patch token")
    g.add_argument("--arch", type=_arch, default=None, metavar="K=V,...", help="architecture overrides (tiny test models)")
    p.add_argument("--store", type=_folder, default=DEFAULT_STORE, help="feature store folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: GPU if any)")


def recipe_from_args(args):
    from .recipe import make_recipe

    return make_recipe(args.model, args.strategy, args.preprocess, args.multiscale, args.source, args.weights,
                       args.n_last_blocks, args.avgpool, args.arch)


def features_from_args(args):
    """The stored feature set the recipe options name (error if it has not been embedded yet)."""
    from .store import load_features

    recipe = recipe_from_args(args)
    path = Path(args.store) / recipe.slug
    if not path.exists():
        hint = _weights_hint(recipe, Path(args.store)) or "run `bannermatch embed` first"
        raise BannermatchError(f"no features for {recipe.label} in {args.store}; {hint}")
    return load_features(path, recipe)


def _weights_hint(recipe, store: Path) -> str:
    """When the store holds this recipe's pass with other weights: which, so the user passes the same --weights."""
    import json

    from .store import MANIFEST

    asked = {k: v for k, v in recipe.pass_dict().items() if k != "weights"}
    for manifest in sorted(store.glob(f"*/{MANIFEST}")):
        try:
            stored = json.loads(manifest.read_text())["recipe"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(stored, dict) and {k: v for k, v in stored.items() if k != "weights"} == asked:
            if stored.get("weights"):
                return f"they were embedded with local weights ({stored['weights']}): pass the same --weights"
            return "they were embedded with the published weights: leave out --weights"
    return ""


def _duplicate_threshold(text: str) -> float:
    from .reports.duplicates import check_threshold

    try:
        return check_threshold(float(text))
    except (ValueError, BannermatchError):
        raise argparse.ArgumentTypeError(f"a duplicate threshold is a cosine similarity in (0, 1], not {text!r}") from None


def _threshold(text: str) -> float | str:
    return text if text == "auto" else _duplicate_threshold(text)


def _issue_list(text: str) -> list[str]:
    from .reports import ISSUES

    issues = [i.strip() for i in text.split(",") if i.strip()]
    unknown = [i for i in issues if i not in ISSUES]
    if unknown or not issues:
        raise argparse.ArgumentTypeError(f"unknown issue {', '.join(unknown) or '(none)'}; choose from: {', '.join(ISSUES)}")
    return issues


def add_exclusion_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kept out of the matches")
    g.add_argument("--dedupe", nargs="?", const="auto", type=_threshold, metavar="T",
                   help="leave out each query's own duplicates (`bannermatch duplicates`; T: the cosine threshold in "
                        "(0, 1], default calibrated on the collection)")
    g.add_argument("--exclude-issues", type=_issue_list, metavar="ISSUE,...",
                   help="leave out banners with these issues (`bannermatch issues`), e.g. placeholder,dark")


def exclusion_from_args(args, fs):
    """The Exclusion the options ask for, or None."""
    from .reports import exclusion, find_duplicates, find_issues

    if not (args.dedupe or args.exclude_issues):
        return None
    duplicates = banned = None
    if args.dedupe:
        threshold = None if args.dedupe == "auto" else args.dedupe
        duplicates = find_duplicates(fs, threshold, weights=args.weights, device=args.device,
                                     progress=not getattr(args, "quiet", False))
    if args.exclude_issues:
        banned = find_issues(fs, progress=not getattr(args, "quiet", False)).keys_with(*args.exclude_issues)
    return exclusion(fs, duplicates, banned or ())


def _int_range(low: int, high: int | None = None, message: str = ""):
    """An argparse type: an integer from ``low`` (to ``high``), else ``message`` as the one-line error."""
    def integer(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(message or f"must be at least {low}")
        return value
    return integer


_positive = _int_range(1)
_non_negative = _int_range(0)
_hash_distance = _int_range(0, 64, "a hash distance is a number of bits from 0 to 64")


# ------------------------------------------------------------------------------------------ subcommands

def cmd_models(args) -> None:
    from .backbones import list_models

    print(f"{'name':<28} {'sources':<10} {'dim':>5} {'patch':>5}  {'input':<8} {'mean/std':<14} description")
    for m in list_models():
        norm = "imagenet" if m.mean[0] == 0.485 else "0.5/0.5"
        print(f"{m.name:<28} {','.join(m.sources):<10} {m.embed_dim:>5} {m.patch_size:>5}  "
              f"{m.input_size}px {m.interpolation:<5} {norm:<8} {m.description}")


def cmd_embed(args) -> None:
    from .extraction import extract_features

    recipe = recipe_from_args(args)
    fs = extract_features(args.images, recipe, args.store, args.weights, args.device, args.batch_size,
                          args.workers, args.chunk_size, progress=not args.quiet, compile=args.compile, dtype=args.dtype,
                          limit=args.limit)
    print(f"{len(fs.keys)} banners embedded ({fs.features.shape[1]}-d) in {fs.path}"
          + (f"; {len(fs.skipped)} skipped (listed in {fs.path / 'manifest.json'})" if fs.skipped else ""))


def cmd_match(args) -> None:
    from .matches import find_matches

    fs = features_from_args(args)
    m = find_matches(fs, args.k, args.device, args.precision, args.backend, exclude=exclusion_from_args(args, fs))
    kept_out = f"; {m.excluded}" if m.excluded else ""
    print(f"top-{args.k} matches of {len(fs.keys)} banners ({m.precision} search{kept_out}) saved in {m.save()}")


def _print_and_draw(fs, queries, k, out, weights=None, device=None, matches=None, exclude=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from .display import show_matches
    from .query import query

    results = query(fs, queries, k=k, weights=weights, device=device, matches=matches, exclude=exclude)
    for r in results:
        print(f"{r.name or r.key} ({r.key or 'new image'}):")
        for key, score in r.matches:
            print(f"  {score:.3f}  {key:>8}  {fs.name(key)}")
    if out:
        try:
            show_matches(fs, queries, k=k, results=results, save=out)
        except OSError as exc:
            raise BannermatchError(f"cannot write the grid {out}: {exc.strerror or exc}") from None
        print(f"grid saved to {out}")


def cmd_show(args) -> None:
    fs = features_from_args(args)
    _print_and_draw(fs, args.queries, args.k, args.out, args.weights, args.device,
                    exclude=exclusion_from_args(args, fs))


#: What `run` takes to work offline (the README promises these two)
RUN_OFFLINE = ("work offline with `bannermatch run --images PATH --weights PATH`: banners you already have (a folder, "
               "an archive or webdataset shards) and a local checkpoint")


def cmd_run(args) -> None:
    """The main job: banners (a snapshot, then the CDN, unless --images holds banners already), features,
    matches, and the example query's grid."""
    from .collection import get_banners
    from .extraction import extract_features
    from .matches import find_matches
    from .steam import NetworkUnreachable

    out = Path(args.out or DEFAULT_GRID)
    try:  # before the work: the grid is its last step
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BannermatchError(f"cannot make the folder of the grid {out}: {exc.strerror or exc}") from None
    try:
        get_banners(args.images, None if args.snapshot == "none" else args.snapshot, args.update, args.host,
                    args.app_list, progress=not args.quiet)
    except NetworkUnreachable as exc:
        raise exc.naming(RUN_OFFLINE) from None
    fs = extract_features(args.images, recipe_from_args(args), args.store, args.weights, args.device,
                          progress=not args.quiet, dtype=args.dtype)
    matches = find_matches(fs, args.k, args.device)
    print(f"top-{args.k} matches of {len(fs.keys)} banners saved in {fs.path}")
    _print_and_draw(fs, args.queries, args.k, out, args.weights, args.device, matches)


def add_core_commands(sub) -> None:
    p = sub.add_parser("models", help="list the available backbones")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("embed", help="embed a collection of banners into the feature store")
    p.add_argument("images", nargs="?", default=DEFAULT_IMAGES,
                   help="folder, .tar/.tar.gz/.zip archive, or folder of webdataset shards (default: %(default)s)")
    add_recipe_options(p)
    p.add_argument("--batch-size", type=_positive,
                   help="images per batch (default: 64 on a GPU, about 4,096 tokens on a CPU: 20 for a /16 model)")
    p.add_argument("--workers", type=_non_negative, help="image decoding processes (default: none on a CPU; with a GPU, as many "
                   "as keep up with the model, timed on the first batches)")
    p.add_argument("--chunk-size", type=_positive, default=2048, help="images per saved chunk: the unit of resuming")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: when the banners left after the first batches outnumber "
                        "the break-even measured for this device and precision; logged)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the model's working precision (default: bf16, or fp16 on GPUs without bf16, where native; "
                        "else fp32)")
    p.add_argument("--limit", type=_positive, metavar="N",
                   help="embed a sample of N banners chosen by app id (the same N, the same sample), to try a "
                        "setting quickly; match/show/gallery read it until the whole collection is embedded")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("match", help="top-k neighbours of every banner (exact cosine)")
    add_recipe_options(p)
    p.add_argument("-k", type=_positive, default=10, help="neighbours per banner (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 where the hardware has it natively (about 2x faster; candidates rescored in "
                        "float32), else float32 (emulated bf16 is several times slower)")
    p.add_argument("--backend", default="torch", choices=("torch", "faiss", "faiss-hnsw"),
                   help="torch: exact (default); faiss: exact, IndexFlatIP; faiss-hnsw: approximate (an HNSW graph), "
                        "for collections past a few hundred thousand banners (extra [faiss])")
    add_exclusion_options(p)
    p.set_defaults(func=cmd_match)

    from .snapshots import NEWEST, SNAPSHOTS

    p = sub.add_parser("run", help="the whole default pipeline: download, embed, match, show an example",
                       description="Get the banners (the newest published snapshot, then the Steam CDN for the games "
                                   "added since; unless --images holds banners already), embed them, match them all "
                                   "and draw the top-k of the queries. Offline: --images PATH and --weights PATH.")
    p.add_argument("--images", default=DEFAULT_IMAGES, help="banners; downloaded here if absent (default: %(default)s)")
    p.add_argument("--snapshot", default=NEWEST, choices=[*SNAPSHOTS, "none"],
                   help="published collection to start from (default: %(default)s); none: the CDN alone")
    p.add_argument("--update", action="store_true", help="also fetch the games added since the last run")
    p.add_argument("--app-list", metavar="FILE",
                   help="games to download (default: Steam's list after a snapshot, else the shipped 29,982 games)")
    p.add_argument("--host", default=STEAM_CDN, help="banner CDN for the download (default: %(default)s)")
    add_recipe_options(p)
    p.add_argument("-k", type=_positive, default=10, help="neighbours per banner (default: %(default)s)")
    p.add_argument("--queries", nargs="+", default=[EXAMPLE_QUERY], help="what to show (default: %(default)s, Euro Truck Simulator 2)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's working precision (default: native bf16/fp16, else fp32)")
    p.add_argument("--out", type=_new_file, metavar="PNG", help=f"grid image (default: {DEFAULT_GRID})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("show", help="print and draw the top-k matches of some queries")
    p.add_argument("queries", nargs="+", help="app ids, game names, image files or URLs")
    add_recipe_options(p)
    p.add_argument("-k", type=_positive, default=10)
    p.add_argument("--out", type=_new_file, metavar="PNG", help="save the grid as a PNG")
    add_exclusion_options(p)
    p.set_defaults(func=cmd_show)


def cmd_evaluate(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from .evaluate import compare, recipe_grid

    recipes = recipe_grid(args.models, args.strategies, args.preprocess, (False, True) if args.multiscale else (False,),
                          source=args.source, weights=args.weights, arch=args.arch)
    result = compare(args.images, recipes, args.store, args.weights, args.device, args.k, args.queries, args.seed,
                     args.transforms, progress=not args.quiet, dtype=args.dtype)
    paths = result.save(args.out)
    print(result.to_markdown())
    print(f"saved {paths['csv']}, {paths['md']} and {paths['png']}")


def add_evaluate_command(sub) -> None:
    from .backbones import SOURCES, list_models
    from .evaluate import STRONG_EDITS, TRANSFORMS
    from .recipe import PREPROCESSING, STRATEGIES

    p = sub.add_parser("evaluate", help="compare settings: copy detection, franchise precision@k, agreement")
    p.add_argument("images", nargs="?", default=DEFAULT_IMAGES, help="the banner collection (default: %(default)s)")
    g = p.add_argument_group("grid of settings (every combination is evaluated)")
    g.add_argument("--models", nargs="+", default=["dino_vitb16"], choices=[m.name for m in list_models()], metavar="NAME")
    g.add_argument("--strategies", nargs="+", default=["simple"], choices=STRATEGIES)
    g.add_argument("--preprocess", nargs="+", default=["crop"], choices=PREPROCESSING)
    g.add_argument("--multiscale", action="store_true", help="evaluate every setting also with multi-scale features")
    g.add_argument("--source", choices=SOURCES, help="where the models come from (default: each model's first)")
    g.add_argument("--weights", metavar="PATH", help="local weights (one model only)")
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--arch", type=_arch, default=None, metavar="K=V,...", help="architecture overrides (tiny test models)")
    p.add_argument("-k", type=_positive, default=10, help="neighbours for recall, precision and overlap (default: %(default)s)")
    p.add_argument("--queries", type=_positive, default=200, help="banners sampled for copy detection (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sample and edit seed (default: %(default)s)")
    p.add_argument("--transforms", nargs="+", choices=list(TRANSFORMS), help=f"copy edits (default: the strong ones, {' '.join(STRONG_EDITS)})")
    p.add_argument("--out", type=_folder, default=f"{DATA_DIR}/evaluation", help="folder for results.csv/.md/.png (default: %(default)s)")
    p.add_argument("--store", type=_folder, default=DEFAULT_STORE, help="feature store folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: GPU if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)


def cmd_gallery(args) -> None:
    from .gallery import write_gallery

    fs = features_from_args(args)
    index = write_gallery(fs, args.queries or None, args.out, args.k, args.images, progress=not args.quiet,
                          exclude=exclusion_from_args(args, fs))
    print(f"gallery of {len(args.queries) or len(fs.keys)} queries written; open {index}")


def add_gallery_command(sub) -> None:
    p = sub.add_parser("gallery", help="write a static HTML gallery of the matches")
    p.add_argument("queries", nargs="*", help="app ids, game names or image files (default: every banner)")
    add_recipe_options(p)
    p.add_argument("-k", type=_positive, default=10, help="matches per query (default: %(default)s)")
    p.add_argument("--out", type=_folder, default=f"{DATA_DIR}/gallery", help="output folder (default: %(default)s)")
    p.add_argument("--images", default="local", choices=("local", "cdn"),
                   help="local: thumbnails copied into the folder (works offline); cdn: link the Steam CDN")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_exclusion_options(p)
    p.set_defaults(func=cmd_gallery)


def _save_report(report, args) -> None:
    """Print the summary, then write what was asked for: JSON, CSV, a gallery page, a PNG grid."""
    print(report.summary())
    for fmt in ("json", "csv"):
        if getattr(args, fmt):
            print(f"{fmt.upper()} written to {getattr(report, f'to_{fmt}')(getattr(args, fmt))}")
    if args.gallery:
        from .gallery import write_report

        print(f"gallery page written; open {write_report(report, args.gallery, args.images, progress=not args.quiet)}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        report.show(save=args.out)
        print(f"grid saved to {args.out}")


def cmd_duplicates(args) -> None:
    from .reports import find_duplicates

    fs = features_from_args(args)
    dups = find_duplicates(fs, args.threshold, weights=args.weights, device=args.device,
                           hash_distance=args.hash_distance, progress=not args.quiet)
    for gi, group in enumerate(dups.groups[:args.list]):
        print(f"group {gi + 1}" + (" (identical pixels)" if group.exact else "") + ":")
        for key, score in zip(group.keys, group.scores):
            print(f"  {score:.3f}  {key:>8}  {fs.name(key)}")
    _save_report(dups, args)


def cmd_unique(args) -> None:
    from .reports import find_unique

    fs = features_from_args(args)
    unique = find_unique(fs, args.n, device=args.device)
    for row in unique.records():
        print(f"{row['rank']:>4}  {row['score']:.3f}  {row['key']:>8}  {row['name']}  "
              f"(nearest: {row['neighbour_name'] or row['neighbour']})")
    _save_report(unique, args)


def cmd_issues(args) -> None:
    from .reports import find_issues

    issues = find_issues(features_from_args(args), progress=not args.quiet)
    for issue, keys in issues.flagged.items():
        if keys:
            shown = ", ".join(f"{issues.features.name(k) or k} ({k})" for k in keys[:args.list])
            print(f"{issue}: {shown}" + (", ..." if len(keys) > args.list else ""))
    _save_report(issues, args)


def cmd_most_played(args) -> None:
    from .reports import most_played

    from .steam import load_app_names

    fs = features_from_args(args)
    names = load_app_names(args.app_list) if args.app_list else None
    report = most_played(fs, args.appids or args.chart, args.k, args.n, args.host, args.api, args.steamspy,
                         args.weights, args.device, exclusion_from_args(args, fs), names)
    for game in report.games:
        if game.matches:
            print(f"#{game.rank} {game.name or game.appid} ({game.appid}): "
                  + ", ".join(f"{fs.name(key) or key} {score:.2f}" for key, score in game.matches[:5]))
    _save_report(report, args)


def add_report_commands(sub) -> None:
    from .reports import CHARTS, STEAMSPY_API
    from .reports.duplicates import HASH_DISTANCE
    from .steam import STEAM_API

    def outputs(p, listed: bool = True) -> None:
        add_recipe_options(p)
        g = p.add_argument_group("output")
        if listed:
            g.add_argument("--list", type=_positive, default=20, metavar="N", help="print the first N (default: %(default)s)")
        g.add_argument("--json", type=_new_file, metavar="FILE", help="write the report as JSON")
        g.add_argument("--csv", type=_new_file, metavar="FILE", help="write the report as CSV, one row per banner")
        g.add_argument("--gallery", type=_folder, metavar="DIR", help="write the report as a page of an HTML gallery folder")
        g.add_argument("--images", default="local", choices=("local", "cdn"), help="gallery thumbnails (see `gallery`)")
        g.add_argument("--out", type=_new_file, metavar="PNG", help="save the grid as a PNG")
        g.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("duplicates", help="groups of duplicate banners (identical pixels, perceptual hash, cosine)",
                       description="Banners are linked by identical decoded pixels, perceptual hashes within "
                                   "--hash-distance bits, or cosine >= --threshold; inside each set of linked banners, "
                                   "groups are formed by complete linkage (every member linked to every other).")
    p.add_argument("--threshold", type=_duplicate_threshold, metavar="T",
                   help="cosine threshold in (0, 1] (default: calibrated once on these features, halfway in distance "
                        "between edited copies and each banner's nearest distinct neighbour; needs the features' "
                        "--weights to embed the copies)")
    p.add_argument("--hash-distance", type=_hash_distance, default=HASH_DISTANCE, metavar="BITS",
                   help="perceptual hashes at most this many bits apart (of 64) are the same picture "
                        "(default: %(default)s)")
    outputs(p)
    p.set_defaults(func=cmd_duplicates)

    p = sub.add_parser("unique", help="banners ranked by their nearest neighbour's similarity, most unique first")
    p.add_argument("-n", type=_positive, default=24, help="how many to list and draw (default: %(default)s)")
    outputs(p, listed=False)
    p.set_defaults(func=cmd_unique)

    p = sub.add_parser("issues", help="dark, light, blurry, low-information, grayscale, odd-size/aspect banners and placeholders")
    outputs(p)
    p.set_defaults(func=cmd_issues)

    p = sub.add_parser("most-played", help="the look-alikes of the most-played games (Steam's chart, SteamSpy, or app ids)",
                       description="Games missing from the collection have their banner fetched from the CDN and "
                                   "embedded with the same recipe (offline: --weights).")
    p.add_argument("appids", nargs="*", help="these app ids instead of a chart")
    p.add_argument("--chart", default="steam", choices=CHARTS,
                   help="steam: ISteamChartsService/GetMostPlayedGames; steamspy: top100in2weeks (default: %(default)s)")
    p.add_argument("-n", type=_positive, default=100, help="games from the chart (default: %(default)s)")
    p.add_argument("-k", type=_positive, default=10, help="look-alikes per game (default: %(default)s)")
    p.add_argument("--host", default=STEAM_CDN, help="banner CDN for missing games (default: %(default)s)")
    p.add_argument("--api", default=STEAM_API, help="Steam Web API (default: %(default)s)")
    p.add_argument("--steamspy", default=STEAMSPY_API, help="SteamSpy API (default: %(default)s)")
    p.add_argument("--app-list", metavar="FILE", help="{appid: name} JSON naming games the collection lacks")
    outputs(p, listed=False)
    add_exclusion_options(p)
    p.set_defaults(func=cmd_most_played)


def cmd_download(args) -> None:
    from .download import download_banners
    from .fetch import fetch_archive
    from .steam import APP_NAMES_FILE, load_app_names, save_app_names

    if args.snapshot:
        from .snapshots import fetch_snapshot

        if args.archive or args.appids or args.app_list:
            raise BannermatchError("--snapshot downloads a whole published collection; it takes no --archive, --appids or --app-list")
        paths = fetch_snapshot(args.snapshot, args.output_dir, progress=not args.quiet)
        print(f"snapshot {args.snapshot} ready in {args.output_dir} ({', '.join(p.name for p in paths)}); "
              f"embed it with `bannermatch embed {args.output_dir}`")
        return
    if args.archive:
        if args.appids or args.update:
            raise BannermatchError("--archive downloads the whole earlier release; it takes no --appids or --update")
        path = fetch_archive(args.archive, args.output_dir, progress=not args.quiet)
        if args.app_list:
            save_app_names(load_app_names(args.app_list), path.parent / APP_NAMES_FILE)
        print(f"archive ready: {path}; embed it with `bannermatch embed {path}`")
        return
    report = download_banners(args.output_dir, args.app_list, args.appids, args.host, args.processes, args.threads,
                              args.distributor, args.timeout, args.retries, progress=not args.quiet,
                              engine=args.engine, update=args.update, recheck_days=args.recheck_days)
    print(report.summary())


def add_download_command(sub) -> None:
    from .download import DEFAULT_RECHECK_DAYS, DISTRIBUTORS, ENGINES
    from .snapshots import SNAPSHOTS
    from .steam import API_KEY_ENV, STEAM_CDN

    p = sub.add_parser("download", help="download Steam's vertical banners into webdataset shards",
                       epilog="Without --app-list/--appids: the list shipped with bannermatch (29,982 games with a "
                              "vertical banner in 2021), or the folder's saved list when resuming; with --update, "
                              f"Steam's current list (games only when {API_KEY_ENV} is set, every app otherwise).")
    p.add_argument("output_dir", nargs="?", type=_folder, default=DEFAULT_IMAGES, help="shard folder (default: %(default)s)")
    apps = p.add_mutually_exclusive_group()
    apps.add_argument("--app-list", metavar="FILE", help="{appid: name} JSON, or a saved GetAppList answer")
    apps.add_argument("--appids", nargs="+", metavar="ID", help="just these app ids")
    p.add_argument("--update", action="store_true",
                   help="fetch only the apps the folder lacks, into new shards; re-check old 404s and failures")
    p.add_argument("--recheck-days", type=float, default=DEFAULT_RECHECK_DAYS, metavar="DAYS",
                   help="--update re-checks apps whose 404 or failure is older than this (default: %(default)s)")
    p.add_argument("--host", default=STEAM_CDN, help="CDN serving /steam/apps/ID/library_600x900.jpg (default: %(default)s)")
    p.add_argument("--engine", default="light", choices=ENGINES,
                   help="light: requests, in this process; img2dataset: its distributors, for clusters (default: %(default)s)")
    p.add_argument("--threads", type=_positive, help="parallel downloads (per process for img2dataset; default: 32)")
    p.add_argument("--processes", type=_positive, help="img2dataset: download processes (default: CPU count, at most 4)")
    p.add_argument("--distributor", default="multiprocessing", choices=DISTRIBUTORS,
                   help="img2dataset: multiprocessing on one machine; pyspark or ray on a cluster (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10, help="seconds per request (default: %(default)s)")
    p.add_argument("--retries", type=int, default=2, help="extra attempts per failed banner (default: %(default)s)")
    p.add_argument("--archive", metavar="URL|PATH",
                   help="instead: fetch the earlier release resized_vertical_steam_banners_v2.tar.gz (resumable)")
    p.add_argument("--snapshot", choices=SNAPSHOTS, metavar="NAME",
                   help=f"instead: fetch a published collection ({', '.join(SNAPSHOTS)}; resumable, read in place)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="bannermatch",
        description="Find Steam games whose banners look alike, with DINO / BEiT / DINOv2 features.",
        epilog="Typical run: bannermatch download; bannermatch embed; bannermatch match; bannermatch show 'Euro Truck Simulator 2'",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    add_core_commands(sub)
    add_download_command(sub)
    add_gallery_command(sub)
    add_evaluate_command(sub)
    add_report_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="bannermatch: %(levelname)s: %(message)s")
    for noisy in ("timm", "urllib3", "httpx", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except BannermatchError as exc:
        print(f"bannermatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bannermatch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
