"""Duplicate groups, unique banners, banner issues and the most-played report, each checked against a brute-force
computation written here (imagehash's pHash for the perceptual links), on synthetic banners with planted copies,
look-alikes and issues."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import shutil
from pathlib import Path

import imagehash

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from bannermatch import extract_features, find_matches, make_recipe, query
from bannermatch.cli import main
from bannermatch.errors import BannermatchError
from bannermatch.evaluate import MILD_EDITS, transformed_copy
from bannermatch.extraction import embed_images, load_backbone
from bannermatch.gallery import write_report
from bannermatch.reports import (ISSUES, calibrate_threshold, exclusion, find_duplicates, find_issues, find_unique,
                                 most_played)
from bannermatch.reports.duplicates import HASH_DISTANCE
from conftest import APPS, TINY_ARCH, StaticServer, draw_banner

DISTINCT = list(APPS)[:12]  # drawn from seeds 0-11
PIXEL_COPY = "900001"  # DISTINCT[0]'s decoded pixels saved again as PNG: an exact duplicate
BYTE_COPY = "900002"  # DISTINCT[1]'s file copied: the same bytes
REENCODED = "900003"  # DISTINCT[2] re-encoded as JPEG quality 70: near, not exact
LOOKALIKE = "900004"  # DISTINCT[3] with a small badge drawn on it
PLACEHOLDERS = [str(910000 + i) for i in range(5)]  # one flat picture under five app ids
ISSUE_KEYS = {"dark": "920001", "light": "920002", "blurry": "920003", "low_information": "920004",
              "grayscale": "920005", "odd_size": "920006", "odd_aspect": "920007"}


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _issue_images() -> dict[str, Image.Image]:
    """One banner made to have each issue, each from its own seed (none is a copy of another banner)."""
    base = {issue: draw_banner(50 + i) for i, issue in enumerate(ISSUE_KEYS)}
    flat = Image.new("RGB", (300, 450), (90, 60, 40))
    ImageDraw.Draw(flat).text((110, 200), "DEMO", fill=(230, 230, 230))
    return {"dark": ImageEnhance.Brightness(base["dark"]).enhance(0.15),
            "light": Image.blend(base["light"], Image.new("RGB", (300, 450), "white"), 0.85),
            "blurry": base["blurry"].filter(ImageFilter.GaussianBlur(4)),
            "low_information": flat,
            "grayscale": ImageOps.grayscale(base["grayscale"]).convert("RGB"),
            "odd_size": draw_banner(56, size=(120, 180)),
            "odd_aspect": draw_banner(57, size=(300, 300))}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("planted")
    images = root / "banners"
    images.mkdir()
    for i, appid in enumerate(DISTINCT):
        (images / f"{appid}.jpg").write_bytes(_jpeg(draw_banner(i)))
    with Image.open(images / f"{DISTINCT[0]}.jpg") as img:
        img.convert("RGB").save(images / f"{PIXEL_COPY}.png")
    shutil.copy(images / f"{DISTINCT[1]}.jpg", images / f"{BYTE_COPY}.jpg")
    with Image.open(images / f"{DISTINCT[2]}.jpg") as img:
        (images / f"{REENCODED}.jpg").write_bytes(_jpeg(img.convert("RGB"), 70))
    badge = draw_banner(3)
    ImageDraw.Draw(badge).ellipse([230, 380, 280, 430], fill=(250, 220, 0))
    (images / f"{LOOKALIKE}.jpg").write_bytes(_jpeg(badge))
    placeholder = Image.new("RGB", (300, 450), (70, 100, 140))
    ImageDraw.Draw(placeholder).text((120, 215), "STEAM", fill=(200, 200, 200))
    for appid in PLACEHOLDERS:
        placeholder.save(images / f"{appid}.png")
    for issue, img in _issue_images().items():
        (images / f"{ISSUE_KEYS[issue]}.jpg").write_bytes(_jpeg(img))
    (images / "apps.json").write_text(json.dumps({a: APPS[a] for a in DISTINCT}))
    recipe = make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)
    return extract_features(images, recipe, root / "store", weights=tiny_weights, device="cpu", progress=False)


# ------------------------------------------------------------------------------------------ brute force

def _file_of(fs, key: str) -> Path:
    return next(Path(fs.images).glob(f"{key}.*"))


def _pixels(fs) -> list[bytes]:
    out = []
    for key in fs.keys:
        with Image.open(_file_of(fs, key)) as img:
            rgb = img.convert("RGB")
            out.append(hashlib.sha256(repr(rgb.size).encode() + rgb.tobytes()).digest())
    return out


def _phashes(fs) -> list[imagehash.ImageHash]:
    return [imagehash.phash(Image.open(_file_of(fs, key)).convert("RGB")) for key in fs.keys]


def _entropy(fs, key: str) -> float:
    grey = np.asarray(Image.open(_file_of(fs, key)).convert("L").resize((256, 384)))
    p = np.bincount(grey.ravel(), minlength=256) / grey.size
    return float(-(p[p > 0] * np.log2(p[p > 0])).sum())


def _strength(fs, threshold: float) -> np.ndarray:
    """Pairwise link strength as the report ranks links: identical pixels 3, pHash within HASH_DISTANCE bits 2,
    else the cosine; but a nearly flat banner (one or two grey tones) only by its pixels. Linked when >= threshold."""
    sims = fs.features @ fs.features.T
    pixels, hashes = _pixels(fs), _phashes(fs)
    structured = [_entropy(fs, key) >= 1.5 for key in fs.keys]
    n = len(fs.keys)
    return np.array([[3.0 if pixels[i] == pixels[j] else -np.inf if not (structured[i] and structured[j]) else
                      2.0 if hashes[i] - hashes[j] <= HASH_DISTANCE else sims[i, j]
                      for j in range(n)] for i in range(n)])


def _brute_groups(fs, threshold: float, strength: np.ndarray | None = None) -> set[frozenset[str]]:
    """Textbook complete linkage over the whole collection: merge the two clusters whose weakest pair is strongest,
    while that pair is linked."""
    strength = _strength(fs, threshold) if strength is None else strength
    clusters = [[i] for i in range(len(fs.keys))]
    while True:
        best, pair = -math.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                weakest = min(strength[i, j] for i in clusters[a] for j in clusters[b])
                if weakest > best:
                    best, pair = weakest, (a, b)
        if pair is None or best < threshold:
            break
        a, b = pair
        clusters[a] += clusters.pop(b)
    return {frozenset(fs.keys[i] for i in c) for c in clusters if len(c) > 1}


def _margin(fs, threshold: float) -> float:
    sims = fs.features @ fs.features.T
    off = sims[~np.eye(len(sims), dtype=bool)]
    return float(np.abs(off - threshold).min())


# ------------------------------------------------------------------------------------------ duplicates

@pytest.mark.parametrize("threshold", [0.995, 0.95])
def test_duplicate_groups_are_brute_force_complete_linkage(planted, threshold):
    fs = planted
    assert _margin(fs, threshold) > 1e-5  # no pair sits on the threshold, where float order could decide
    strength = _strength(fs, threshold)
    expected = _brute_groups(fs, threshold, strength)
    dups = find_duplicates(fs, threshold, progress=False)
    assert {frozenset(g.keys) for g in dups.groups} == expected
    # with neighbour lists too short for the placeholder's five copies, whole rows are searched instead
    few = find_matches(fs, 2, save=False)
    assert {frozenset(g.keys) for g in find_duplicates(fs, threshold, matches=few, progress=False).groups} == expected
    sims = fs.features @ fs.features.T
    for g in dups.groups:
        rows = [fs.index_of(k) for k in g.keys]
        assert strength[np.ix_(rows, rows)].min() >= threshold  # every member linked to every other
        block = sims[np.ix_(rows, rows)] - 3 * np.eye(len(rows))
        pixels = dict(zip(g.keys, g.pixels))
        for key, score, best in zip(g.keys, g.scores, block.max(1)):
            twin = list(pixels.values()).count(pixels[key]) > 1
            assert score == pytest.approx(1.0 if twin else best, abs=1e-5)
    assert [len(g.keys) for g in dups.groups] == sorted((len(g.keys) for g in dups.groups), reverse=True)


def _with_features(fs, tmp_path, vectors: dict[str, np.ndarray]):
    """The planted set with some banners' features replaced (others spread at random), kept in ``tmp_path``."""
    rng = np.random.default_rng(7)
    features = rng.normal(size=(len(fs.keys), 64)).astype(np.float32)
    for key, v in vectors.items():
        features[fs.index_of(key)] = v
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return dataclasses.replace(fs, path=tmp_path, features=features)


def test_a_chain_of_look_alikes_does_not_join_its_distinct_ends(planted, tmp_path):
    """A~B and B~C above the threshold, A and C far apart: union-find made one group of three."""
    a, b, c = DISTINCT[5:8]
    base, side = np.eye(64, dtype=np.float32)[0], np.eye(64, dtype=np.float32)[1]
    fs = _with_features(planted, tmp_path, {a: base + 0.2 * side, b: base, c: base - 0.25 * side})
    sims = fs.features @ fs.features.T
    ia, ib, ic = (fs.index_of(k) for k in (a, b, c))
    assert sims[ia, ib] > sims[ib, ic] > 0.95 > sims[ia, ic]
    dups = find_duplicates(fs, 0.95, progress=False)
    assert set(dups.group_of(a).keys) == {a, b} and dups.group_of(c) is None


def test_a_group_larger_than_a_few_percent_is_reported(planted, tmp_path, caplog):
    base = np.eye(64, dtype=np.float32)[0]
    # banners without a pixel or hash twin (the flat low-information one shares the placeholders' hash)
    alone = [*DISTINCT[4:], *(ISSUE_KEYS[i] for i in ("dark", "light", "blurry", "grayscale"))]
    close = {key: base + 0.01 * np.eye(64, dtype=np.float32)[1 + i] for i, key in enumerate(alone)}
    with caplog.at_level(logging.WARNING, logger="bannermatch"):
        dups = find_duplicates(_with_features(planted, tmp_path, close), 0.99, progress=False)
    assert {frozenset(g.keys) for g in dups.groups if len(g.keys) >= 12} == {frozenset(close)}
    assert "a duplicate group holds 12 of" in caplog.text


@pytest.mark.parametrize("bad", [0.0, -1.0, 1.5, float("nan"), "0.9"])
def test_a_threshold_outside_0_1_is_refused(planted, bad):
    with pytest.raises(BannermatchError, match=r"in \(0, 1\]"):
        find_duplicates(planted, bad, progress=False)


def test_exact_copies_are_decoded_pixels_not_bytes(planted):
    fs = planted
    dups = find_duplicates(fs, 0.995, progress=False)
    group = {k: g for g in dups.groups for k in g.keys}
    pixel_of = {k: p for g in dups.groups for k, p in zip(g.keys, g.pixels)}
    assert pixel_of[PIXEL_COPY] == pixel_of[DISTINCT[0]]  # same pixels, other bytes (PNG of a JPEG)
    assert pixel_of[BYTE_COPY] == pixel_of[DISTINCT[1]]
    assert group[REENCODED] is group[DISTINCT[2]] and pixel_of[REENCODED] != pixel_of[DISTINCT[2]]
    assert group[PLACEHOLDERS[0]].exact and set(group[PLACEHOLDERS[0]].keys) == set(PLACEHOLDERS)
    assert not group[REENCODED].exact
    records = dups.records()
    assert {r["key"] for r in records} == set(group) and all(r["name"] == APPS.get(r["key"], "") for r in records)


def test_default_threshold_is_calibrated_from_copies_and_distinct_neighbours(planted, tiny_weights, monkeypatch):
    """Halfway in distance between the median cosine of mild edited copies (a tenth of the collection, one edit
    each, embedded here again) and the median cosine of each banner's nearest neighbour that neither identical
    pixels nor pHash link to it (brute force over the full matrix)."""
    import bannermatch.evaluate

    fs = planted
    calls = []
    real = bannermatch.evaluate.copy_features
    monkeypatch.setattr(bannermatch.evaluate, "copy_features", lambda *a, **k: calls.append(k) or real(*a, **k))
    cal = calibrate_threshold(fs, tiny_weights, "cpu", progress=False)
    assert cal.n_copies == len(fs.keys) // 10 and calls[0]["one_edit_each"]
    _, true_index, edits = real(fs, tiny_weights, "cpu", cal.n_copies, 0, MILD_EDITS, False, one_edit_each=True)
    assert edits == list(MILD_EDITS[:cal.n_copies])
    originals = [Image.open(_file_of(fs, fs.keys[i])).convert("RGB") for i in true_index]
    copies = embed_images([transformed_copy(img, edit, 0, fs.keys[i]) for img, edit, i in zip(originals, edits, true_index)],
                          fs.recipe, load_backbone(fs.recipe, tiny_weights, "cpu", "auto"))  # as the library
    c = float(np.median(np.sum(copies * fs.features[true_index], axis=1)))
    strength = _strength(fs, 0.0)
    sims = fs.features @ fs.features.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :10]  # the stored top-10, as the report reads them
    distinct = [sims[i, j] for i, row in enumerate(order) for j in row[(strength[i, row] < 2)][:1]]
    d = float(np.median(distinct))
    assert cal.copies == pytest.approx(c, abs=1e-4) and cal.distinct == pytest.approx(d, abs=1e-5)
    assert cal.threshold == pytest.approx(1 - math.sqrt((1 - c) * (1 - d)), abs=1e-4)
    assert "midpoint" in cal.rule and f"{c:.3f}" in cal.rule
    # cached: neither the copies nor the calibration are computed again, and the report uses it
    monkeypatch.setattr(bannermatch.evaluate, "copy_features", lambda *a, **k: pytest.fail("embedded again"))
    assert calibrate_threshold(fs, progress=False) == cal
    dups = find_duplicates(fs, None, progress=False)
    assert dups.threshold == cal.threshold and dups.calibration == cal and cal.rule in dups.summary()


def test_dedupe_leaves_a_querys_own_duplicates_out(planted):
    fs = planted
    dups = find_duplicates(fs, 0.995, progress=False)
    own = set(dups.group_of(DISTINCT[2]).keys)
    ex = exclusion(fs, dups)
    plain = query(fs, DISTINCT[2], k=5)[0].matches
    assert plain[0][0] in own  # without it, its re-encoded copy comes first
    kept = query(fs, DISTINCT[2], k=5, exclude=ex)[0].matches
    sims = fs.features @ fs.features[fs.index_of(DISTINCT[2])]
    allowed = np.sort([s for key, s in zip(fs.keys, sims) if key not in own])[::-1][:5]
    assert [s for _, s in kept] == pytest.approx(allowed, abs=1e-5)  # the best five of the others
    assert all(sims[fs.index_of(key)] == pytest.approx(s, abs=1e-5) and key not in own for key, s in kept)
    matches = find_matches(fs, 5, exclude=ex)
    assert [s for _, s in matches.of(DISTINCT[2])] == pytest.approx(allowed, abs=1e-5) and matches.excluded
    for key in fs.keys:  # every list: no member of the banner's own group
        group = dups.group_of(key)
        assert not {m for m, _ in matches.of(key)} & (set(group.keys) if group else set())
    assert matches.save() != find_matches(fs, 5).path  # the plain matches stay as they are
    # banned keys never show up, for stored and new queries alike
    banned = exclusion(fs, banned=PLACEHOLDERS)
    assert not {m for r in query(fs, [DISTINCT[4], fs.keys[0]], k=20, exclude=banned) for m, _ in r.matches} & set(PLACEHOLDERS)


def test_duplicates_command_writes_json_csv_and_a_gallery_page(planted, tiny_weights, tmp_path, capsys):
    recipe = ["--model", "dino_vits16", "--weights", str(tiny_weights), "--device", "cpu", "--quiet",
              "--arch", ",".join(f"{k}={v}" for k, v in TINY_ARCH.items()), "--store", str(planted.path.parent)]
    out = tmp_path / "out"
    out.mkdir()
    assert main(["duplicates", "--threshold", "0.995", *recipe, "--json", str(out / "d.json"), "--csv",
                 str(out / "d.csv"), "--gallery", str(out / "g"), "--out", str(out / "d.png")]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "d.json").read_text())
    expected = _brute_groups(planted, 0.995)
    assert {frozenset(m["key"] for m in g["members"]) for g in data["groups"]} == expected
    assert f"{len(expected)} duplicate groups" in printed
    page = (out / "g" / "duplicates.html").read_text()
    assert all(f'<span class="bm-key">{key}</span>' in page for g in expected for key in g)
    assert APPS[DISTINCT[2]] in page and len(list((out / "g" / "thumbs").glob("*.jpg"))) == sum(map(len, expected))
    assert (out / "d.csv").read_text().count("\n") == 1 + sum(map(len, expected))
    assert Image.open(out / "d.png").size[0] > 500
    assert data["rule"] == "given" and data["hash_distance"] == HASH_DISTANCE


@pytest.mark.parametrize("args", [["duplicates", "--threshold", "-1"], ["duplicates", "--threshold", "0"],
                                  ["duplicates", "--threshold", "2"], ["duplicates", "--threshold", "nan"],
                                  ["duplicates", "--threshold", "x"], ["duplicates", "--hash-distance", "65"],
                                  ["show", "1", "--dedupe", "0"], ["match", "--dedupe", "1.01"]])
def test_bad_duplicate_settings_are_one_line_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "(0, 1]" in err[0] or "0 to 64" in err[0] or "invalid" in err[0]


# ------------------------------------------------------------------------------------------ unique

def test_unique_ranking_is_the_brute_force_nearest_neighbour_order(planted):
    fs = planted
    sims = fs.features @ fs.features.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.max(1)
    unique = find_unique(fs, n=5)
    assert unique.scores == pytest.approx(np.sort(nearest), abs=1e-5)
    for key, neighbour, score in zip(unique.keys, unique.neighbours, unique.scores):
        i = fs.index_of(key)
        assert score == pytest.approx(nearest[i], abs=1e-5)
        assert sims[i, fs.index_of(neighbour)] == pytest.approx(nearest[i], abs=1e-5)
    chosen = [fs.index_of(k) for k in unique.keys[:5]]
    assert nearest[chosen].max() == pytest.approx(unique.threshold, abs=1e-5)
    assert np.delete(nearest, chosen).min() >= unique.threshold - 1e-5
    assert {r["key"] for r in unique.records()} == {fs.keys[i] for i in chosen}
    assert not set(unique.keys[:5]) & set(PLACEHOLDERS)  # exact copies are the least unique


# ------------------------------------------------------------------------------------------ issues

@pytest.fixture(scope="module")
def issues(planted):
    return find_issues(planted, progress=False)


@pytest.mark.parametrize("issue", ISSUES)
def test_each_detector_flags_the_banner_made_to_have_it_and_no_other(issues, issue):
    expected = set(PLACEHOLDERS) if issue == "placeholder" else {ISSUE_KEYS[issue]}
    if issue == "low_information":
        expected |= set(PLACEHOLDERS)  # a flat picture with one word is both
    assert set(issues.flagged[issue]) == expected
    assert issues.counts()[issue] == len(expected)


def test_measures_are_cached_by_banner_content(planted, issues, monkeypatch, tmp_path):
    import bannermatch.reports.measures

    cache = json.loads((planted.path / "image_stats.json").read_text())
    assert set(cache["measures"]) == set(planted.digests)
    monkeypatch.setattr(bannermatch.reports.measures, "iter_banners", lambda *a, **k: pytest.fail("banners read again"))
    again = find_issues(planted, progress=False)
    assert again.flagged == issues.flagged
    assert issues.keys_with("dark", "placeholder") == {ISSUE_KEYS["dark"], *PLACEHOLDERS}
    issues.to_json(tmp_path / "i.json")
    assert json.loads((tmp_path / "i.json").read_text())["counts"] == issues.counts()
    page = write_report(issues, tmp_path / "g", progress=False)
    assert all(f'<span class="bm-key">{key}</span>' in page.read_text() for key in issues.keys_with())


# ------------------------------------------------------------------------------------------ most played

MISSING = "999001"  # not in the collection; its banner is on the CDN (a re-encoded copy of DISTINCT[5])
NO_BANNER = "999002"  # not in the collection, and 404 on the CDN


def test_most_played_against_a_fake_steam_api_and_cdn(planted, tiny_weights, tmp_path, capsys):
    fs = planted
    with Image.open(_file_of(fs, DISTINCT[5])) as img:
        missing_banner = _jpeg(img.convert("RGB"), 80)
    ranks = [{"rank": 2, "appid": int(MISSING), "last_week_rank": 3, "peak_in_game": 100},
             {"rank": 1, "appid": int(DISTINCT[4]), "last_week_rank": 1, "peak_in_game": 900},
             {"rank": 3, "appid": int(NO_BANNER), "last_week_rank": 2, "peak_in_game": 50}]
    files = {"/ISteamChartsService/GetMostPlayedGames/v1/": json.dumps({"response": {"ranks": ranks}}).encode(),
             f"/steam/apps/{MISSING}/library_600x900.jpg": missing_banner}
    with StaticServer(files) as steam:
        report = most_played(fs, "steam", k=4, host=steam.url, api=steam.url, weights=tiny_weights, device="cpu",
                             names={MISSING: "Missing Game", NO_BANNER: "Bannerless"})
        recipe = ["--model", "dino_vits16", "--weights", str(tiny_weights), "--device", "cpu", "--quiet",
                  "--arch", ",".join(f"{k}={v}" for k, v in TINY_ARCH.items()), "--store", str(fs.path.parent)]
        assert main(["most-played", "--api", steam.url, "--host", steam.url, "-k", "4", *recipe,
                     "--json", str(tmp_path / "mp.json"), "--gallery", str(tmp_path / "g")]) == 0
    assert [(g.rank, g.appid) for g in report.games] == [(1, DISTINCT[4]), (2, MISSING), (3, NO_BANNER)]
    assert [g.status for g in report.games][:2] == ["in collection", "fetched"]
    assert report.games[2].status.startswith("unavailable") and "404" not in report.games[2].status
    assert report.games[0].matches == query(fs, DISTINCT[4], k=4)[0].matches
    # the fetched banner, embedded here by hand: the same top-4, its original first
    backbone = load_backbone(fs.recipe, tiny_weights, "cpu", "auto")  # the precision queries are embedded in
    feats = embed_images([Image.open(io.BytesIO(missing_banner)).convert("RGB")], fs.recipe, backbone)[0]
    sims = fs.features @ feats
    top = np.argsort(-sims)[:4]
    assert [k for k, _ in report.games[1].matches] == [fs.keys[i] for i in top] and top[0] == fs.index_of(DISTINCT[5])
    assert [s for _, s in report.games[1].matches] == pytest.approx(sims[top], abs=1e-4)
    assert "fetched: Missing Game (999001)" in report.summary() and "Bannerless (999002)" in report.summary()
    data = json.loads((tmp_path / "mp.json").read_text())
    assert data["fetched"] == [MISSING] and data["unavailable"] == [NO_BANNER]
    assert [m["key"] for m in data["games"][1]["matches"]] == [k for k, _ in report.games[1].matches]
    page = (tmp_path / "g" / "most_played.html").read_text()
    assert "fetched from the CDN" in page and "data:image/jpeg;base64," in page
    assert "in the collection, 1 fetched from the CDN, 1 unavailable" in capsys.readouterr().out


def test_most_played_from_steamspy_and_given_app_ids(planted, tiny_weights):
    top = {DISTINCT[6]: {"appid": int(DISTINCT[6]), "name": "Six", "ccu": 10},
           DISTINCT[7]: {"appid": int(DISTINCT[7]), "name": "Seven", "ccu": 5}}
    with StaticServer({"/api.php?request=top100in2weeks": json.dumps(top).encode()}) as spy:
        report = most_played(planted, "steamspy", k=3, n=1, steamspy=f"{spy.url}/api.php")
    assert [(g.appid, g.name) for g in report.games] == [(DISTINCT[6], APPS[DISTINCT[6]])]
    given = most_played(planted, [DISTINCT[8], DISTINCT[9]], k=2)
    assert [g.appid for g in given.games] == [DISTINCT[8], DISTINCT[9]] and not given.fetched


def test_report_pages_escape_names(planted, tmp_path):
    from dataclasses import replace

    evil = '<script>window.__pwned=1</script> "q" & \'s\''
    fs = replace(planted, names={**planted.names, DISTINCT[2]: evil})
    report = most_played(fs, [DISTINCT[2]], k=2)
    for page in (write_report(find_duplicates(fs, 0.995, progress=False), tmp_path, images="cdn"),
                 write_report(report, tmp_path, images="cdn")):
        html = page.read_text()
        assert "<script" not in html and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html


def test_banners_the_measuring_pass_could_not_read_are_not_hash_twins():
    """Unmeasured banners have no hash (not hash 0, which would make them all twins of each other and of any
    banner with few bits set); nearly flat ones are linked by pixels alone."""
    from bannermatch.reports.duplicates import _link_inputs, hash_pairs

    measures = {"1": {"pixels": "p1", "phash": "00000000000000ff", "entropy": 4.0},
                "2": {"pixels": "p2", "phash": "00000000000000ff", "entropy": 0.5}}
    pixels, bits, by_hash, by_cosine = _link_inputs(measures, ["1", "2", "3", "4"])
    assert by_hash.tolist() == [True, False, False, False] and by_cosine.tolist() == [True, False, True, True]
    assert pixels.tolist() == ["p1", "p2", "", ""]
    assert [len(p) for p in hash_pairs(bits, by_hash, 8)] == [0, 0]
    assert [p.tolist() for p in hash_pairs(bits, np.ones(4, bool), 8)] != [[], []]  # what the mask prevents


@pytest.mark.parametrize("max_distance", [0, 3, 8, 12])  # 12: past the slices' reach, every pair compared
def test_hash_pairs_are_every_pair_within_the_distance(max_distance):
    """Multi-index hashing finds exactly the pairs a comparison of every pair finds, each once, in order: planted
    pairs at 0-12 bits apart (across the slice boundaries), hashes with few bits set (their slices collide), and
    banners the mask leaves out."""
    from bannermatch.reports.duplicates import hash_pairs

    rng = np.random.default_rng(max_distance)
    base = rng.integers(0, 2**63, 150, dtype=np.uint64) | (rng.integers(0, 2, 150, dtype=np.uint64) << np.uint64(63))
    near = base.copy()
    for i in range(150):
        for bit in rng.choice(64, i % 13, replace=False):
            near[i] ^= np.uint64(1) << np.uint64(bit)
    sparse = np.array([1 << int(b) for b in rng.integers(0, 64, 40)], np.uint64)
    bits = np.concatenate([base, near, sparse, np.zeros(3, np.uint64)])
    linkable = rng.random(len(bits)) > 0.1
    ref = [(i, j) for i in range(len(bits)) for j in range(i + 1, len(bits))
           if linkable[i] and linkable[j] and bin(int(bits[i] ^ bits[j])).count("1") <= max_distance]
    i, j = hash_pairs(bits, linkable, max_distance)
    assert list(zip(i.tolist(), j.tolist())) == ref
    assert len(ref) >= 10
