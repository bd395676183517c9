"""Search: exact top-k kernels against brute force, ties, bf16 and faiss; all-vs-all matches and queries."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bannermatch import BannermatchError, extract_features, find_matches, make_recipe, query
from bannermatch import search as search_mod
from bannermatch.search import top_k

from conftest import APPS, TINY_ARCH


def _recipe(tiny_weights, **kw):
    return make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH, **kw)


# ------------------------------------------------------------------------------------------ search

def _all_pairs_top_k(x, k, **kw):
    """``top_k`` of every row against all rows, itself excluded: the general path and the symmetric one."""
    return top_k(x, x, k, exclude=np.arange(len(x)), **kw), search_mod.top_k_all_pairs(x, k, **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(64, 800), (37, 53), (8, 8), (5, 9), (16, 3)])
def test_selection_finds_exactly_the_scores_above_their_thresholds(shape, dtype):
    """_above skips groups of 8 rows by their column maxima: every score strictly above its row's threshold, or
    its column's, must be found, once, with its value, whatever the shape (part of a group at the edge), where
    a group's lowest threshold is a row's and where it is a column's."""
    import torch

    rng = np.random.default_rng(sum(shape))
    scores = torch.from_numpy(rng.uniform(0.05, 1, shape).astype(np.float32)).to(getattr(torch, dtype))
    rows, cols = (torch.full((size,), 1.05) for size in shape)  # above every score
    rows[::5], cols[::7] = 0.9, 0.06  # a few rows with a little above, columns with nearly everything
    row_parts, col_parts, grouped = search_mod._above(scores, rows, cols)
    assert not grouped
    for parts, thresholds in zip((row_parts, col_parts), (rows[:, None], cols[None, :])):
        r, c, v = (torch.cat(found) for found in zip(*parts))
        expected = torch.nonzero(scores > thresholds.to(scores.dtype))
        assert sorted(zip(r.tolist(), c.tolist())) == [tuple(e) for e in expected.tolist()]
        assert torch.equal(v, scores[r, c])


@pytest.mark.parametrize("first_columns", [4096, 16])  # all columns at once; in widening ranges
@pytest.mark.parametrize("shape", [(64, 800), (37, 53), (5, 9)])
def test_selection_hands_each_row_and_column_only_its_best_in_order(shape, first_columns, monkeypatch):
    """With ``keep`` (bf16 on CPU), _above hands each row only its ``keep`` best scores above its threshold, and
    each column, from each part, its ``keep`` best above its own: by row (column), best first, so the merge need
    not sort; a list of ``keep`` could take nothing else. Scanned in widening column ranges, a row's threshold
    rises as it meets its best: the same offers."""
    import torch

    monkeypatch.setattr(search_mod, "_FIRST_COLUMNS", first_columns)

    keep = 3
    rng = np.random.default_rng(sum(shape))
    scores = torch.from_numpy(rng.uniform(0.05, 1, shape).astype(np.float32)).to(torch.bfloat16)
    rows, cols = (torch.full((size,), 1.05) for size in shape)
    rows[::5], cols[::7] = 0.5, 0.06  # rows with more than keep above, and columns with nearly everything
    row_parts, col_parts, grouped = search_mod._above(scores, rows, cols, keep)
    assert grouped
    for parts, thresholds, axis in ((row_parts, rows[:, None], 0), (col_parts, cols[None, :], 1)):
        kept = {}
        for r, c, v in parts:
            assert torch.equal(v, scores[r, c]) and bool((v > thresholds.to(v.dtype)[r if axis == 0 else 0,
                                                                                      c if axis else 0]).all())
            target = (r, c)[axis]
            assert bool((target[1:] >= target[:-1]).all())
            same = target[1:] == target[:-1]
            assert bool((v[1:][same] <= v[:-1][same]).all())  # best first
            for t, value in zip(target.tolist(), v.float().tolist()):
                kept.setdefault(t, []).append(value)
        line = scores if axis == 0 else scores.T
        for t in range(line.shape[0]):
            above = sorted(line[t][line[t] > thresholds.flatten()[t].to(line.dtype)].float().tolist(), reverse=True)
            if axis == 0:
                assert kept.get(t, []) == above[:keep]
            else:  # each part keeps its own best: together, the column's best are among them
                assert sorted(kept.get(t, []), reverse=True)[:keep] == above[:keep]
        assert any(len(v) >= keep for v in kept.values())


@pytest.mark.parametrize("tile", [(10, 23), (20, 7)])  # tiles that cut across the blocks; blocks taller than tiles
@pytest.mark.parametrize("n,d,k", [(103, 16, 7), (64, 8, 1)])
def test_search_equals_brute_force(n, d, k, tile, monkeypatch):
    monkeypatch.setattr(search_mod, "_CHUNK_BYTES", 4 * n * 10)  # 10-row chunks: N is not a multiple
    monkeypatch.setattr(search_mod, "_TILE", tile)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    ref = np.argsort(-full, axis=1, kind="stable")[:, :k]
    for idx, scores in _all_pairs_top_k(x, k):
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_allclose(scores, np.take_along_axis(full, ref, 1), atol=1e-6)
        assert not (idx == np.arange(n)[:, None]).any()


@pytest.mark.parametrize("copies", [6, 40])  # 40: more tied duplicates than the extra candidates kept
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_ties_are_broken_by_index_across_the_kth_place(copies, precision, monkeypatch):
    base = np.eye(4, dtype=np.float32)
    x = np.concatenate([base[[0]]] * copies + [base[[1]]] * 3)  # identical banners: ties for k=3
    monkeypatch.setattr(search_mod, "_CHUNK_BYTES", 4 * len(x) * 7)  # the ties span several blocks
    monkeypatch.setattr(search_mod, "_TILE", (7, 11))
    for idx, scores in _all_pairs_top_k(x, 3, precision=precision):
        assert idx[0].tolist() == [1, 2, 3] and idx[copies - 1].tolist() == [0, 1, 2]
        assert idx[copies + 1].tolist() == [copies, copies + 2, 0]
        assert np.all(scores[:copies] == 1.0) and scores[copies + 1].tolist() == [1.0, 1.0, 0.0]
        for _ in range(2):
            assert np.array_equal(search_mod.top_k_all_pairs(x, 3, precision=precision)[0], idx)


def _reference_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Brute force in float64, each row's scores summed elementwise (identical vectors score identically)."""
    x64 = x.astype(np.float64)
    out = []
    for i in range(len(x)):
        scores = (x64[i] * x64).sum(axis=1)
        scores[i] = -np.inf
        out.append(np.argsort(-scores, kind="stable")[:k])
    return np.array(out)


@pytest.mark.parametrize("scale", [1.0, 100.0])  # unit vectors, and features that were never normalised
def test_duplicate_banners_tie_exactly_wherever_the_blocks_fall(scale, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) / scale
    copies = np.sort(rng.choice(1500, 150, replace=False))
    x[copies] = x[copies[0]]  # one banner 150 times: a matrix product rounds its scores by position
    monkeypatch.setattr(search_mod, "_CHUNK_BYTES", 4 * len(x) * 250)  # 6 blocks
    monkeypatch.setattr(search_mod, "_TILE", (250, 400))
    ref = _reference_top_k(x, 10)
    for idx, scores in _all_pairs_top_k(x, 10):
        np.testing.assert_array_equal(idx, ref)
        assert np.all(np.diff(scores, axis=1) <= 0)
    assert ref[copies[-1]].tolist() == copies[:10].tolist()  # a copy's matches: the first copies, in order


def test_all_pairs_search_equals_the_general_search_on_clustered_features(monkeypatch):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((150, 48))
    x = (centres[rng.integers(0, 150, 3001)] + 0.3 * rng.standard_normal((3001, 48))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # close neighbours, as in a game series
    monkeypatch.setattr(search_mod, "_CHUNK_BYTES", 4 * len(x) * 500)  # 7 blocks, the last one short
    monkeypatch.setattr(search_mod, "_FIRST_COLUMNS", 64)  # rows' thresholds rise along a tile
    offers, best_offers = [], search_mod._best_offers

    def counted(targets, *rest):
        kept = best_offers(targets, *rest)
        offers.append((len(targets), len(kept[0])))
        return kept

    monkeypatch.setattr(search_mod, "_best_offers", counted)
    for precision in search_mod.PRECISIONS:
        (idx, scores), (pair_idx, pair_scores) = _all_pairs_top_k(x, 10, precision=precision)
        np.testing.assert_array_equal(pair_idx, idx)
        np.testing.assert_allclose(pair_scores, scores, atol=1e-6)
    assert sum(kept for _, kept in offers) < sum(found for found, _ in offers)  # bf16: rows' offers were cut


def test_bf16_search_and_faiss_agree_with_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact, scores = top_k(x, x, 10, np.arange(2000))
    for fast, fast_scores in _all_pairs_top_k(x, 10, precision="bfloat16"):
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, fast)])
        assert recall >= 0.99
        same = fast == exact
        np.testing.assert_allclose(fast_scores[same], scores[same], atol=1e-6)  # rescored exactly in fp32
    f_idx, f_scores = search_mod.top_k_faiss(x, x, 10, np.arange(2000))
    assert np.mean(f_idx == exact) > 0.999
    np.testing.assert_allclose(f_scores, scores, atol=1e-5)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [38, 39])  # k near N: lists that never fill before the last tile
def test_all_pairs_equals_brute_force_with_k_near_n(k, precision, monkeypatch):
    monkeypatch.setattr(search_mod, "_TILE", (7, 11))
    rng = np.random.default_rng(k)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # some pairs score below 0: thresholds that are not positive
    idx, scores = search_mod.top_k_all_pairs(x, k, precision=precision)
    np.testing.assert_array_equal(idx, _reference_top_k(x, k))
    np.testing.assert_allclose(scores, np.take_along_axis(x @ x.T, idx, 1), atol=1e-6)


def _clustered(n, d, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 10, d))
    x = (centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hnsw_backend_finds_the_exact_neighbours_of_clustered_features():
    x = _clustered(4000, 32, 5)
    exact, _ = search_mod.top_k_all_pairs(x, 10)
    approx, scores = search_mod.top_k_faiss(x, x, 10, np.arange(len(x)), approximate=True)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert recall >= 0.95, recall
    assert not (approx == np.arange(len(x))[:, None]).any()  # itself left out
    np.testing.assert_allclose(scores, np.take_along_axis(x @ x.T, approx, 1), atol=1e-5)


def test_find_matches_backends(banner_dir, tiny_weights, tmp_path):
    fs = extract_features(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights, workers=0, progress=False)
    exact = find_matches(fs, k=3, precision="float32", save=False)
    hnsw = find_matches(fs, k=3, backend="faiss-hnsw")
    assert hnsw.backend == "faiss-hnsw" and hnsw.precision == "float32" and ".faiss-hnsw." in hnsw.path.name
    np.testing.assert_array_equal(hnsw.neighbours, exact.neighbours)  # 21 banners: the graph reaches them all
    with pytest.raises(BannermatchError, match=r"unknown backend 'annoy'; choose one of: torch, faiss, faiss-hnsw$"):
        find_matches(fs, k=3, backend="annoy")


def test_k_larger_than_collection_is_an_error():
    x = np.eye(5, dtype=np.float32)
    with pytest.raises(BannermatchError, match="k=5 is larger than the 4"):
        top_k(x, x, 5, exclude=np.arange(5))


# ------------------------------------------------------------------------------------------ matching and queries

def test_matches_saved_and_near_duplicate_is_top1(banner_dir, tiny_weights, tmp_path):
    import shutil

    d = tmp_path / "imgs"
    shutil.copytree(banner_dir, d)
    original = Image.open(banner_dir / "227300.jpg")
    buf = io.BytesIO()
    original.resize((290, 436)).save(buf, "JPEG", quality=60)  # re-encoded and slightly resized
    (d / "999999.jpg").write_bytes(buf.getvalue())
    fs = extract_features(d, _recipe(tiny_weights), tmp_path / "f", tiny_weights, workers=0, progress=False)
    m = find_matches(fs, k=5)
    assert m.of("999999")[0][0] == "227300"  # the near-duplicate finds its original first
    assert m.neighbours.dtype == np.int64
    with np.load(m.path) as saved:
        assert saved["neighbours"].shape == (21, 5)
    again = find_matches(fs, k=3)  # reused from disk, sliced
    np.testing.assert_array_equal(again.neighbours, m.neighbours[:, :3])


def test_query_by_key_name_and_new_image(banner_dir, tiny_weights, tmp_path):
    fs = extract_features(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights, workers=0, progress=False)
    by_key, by_name, by_image = query(fs, ["227300", "euro truck simulator 2", str(banner_dir / "227300.jpg")],
                                      k=3, weights=tiny_weights)
    assert by_key.key == by_name.key == "227300" and by_key.name == "Euro Truck Simulator 2"
    assert by_key.matches == by_name.matches and "227300" not in [k for k, _ in by_key.matches]
    assert by_image.key is None and by_image.matches[0][0] == "227300" and by_image.matches[0][1] > 0.99
    with pytest.raises(BannermatchError, match="no game in this feature set"):
        query(fs, "definitely not a game title")
    with pytest.raises(BannermatchError, match="not in this feature set"):
        query(fs, "123456789")


def test_show_matches_draws_query_and_topk(banner_dir, tiny_weights, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from bannermatch.display import show_matches

    fs = extract_features(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights, workers=0, progress=False)
    fig = show_matches(fs, "Euro Truck Simulator 2", k=10, save=tmp_path / "grid.png")
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 11  # query + 10 matches, each with its banner
    titles = [ax.get_title() for ax in drawn]
    assert titles[0].startswith("QUERY\nEuro Truck Simulator 2") and "227300" in titles[0]
    assert all(any(APPS[k][:10] in t for k in APPS) for t in titles[1:])
    assert Image.open(tmp_path / "grid.png").size[0] > 500


def test_saved_matches_follow_the_banners_bytes_and_the_search_settings(banner_dir, tiny_weights, tmp_path):
    """Bug: saved matches were checked on the keys and k only, so re-embedding changed banners under the same app
    ids, or asking for another precision, returned the old file."""
    import shutil

    from conftest import draw_banner

    d = tmp_path / "imgs"
    shutil.copytree(banner_dir, d)
    recipe = _recipe(tiny_weights)
    before = find_matches(extract_features(d, recipe, tmp_path / "store", tiny_weights, progress=False), 3,
                          precision="float32")
    shutil.copy(d / "570.jpg", d / "227300.jpg")  # same app ids, other bytes: 227300 now looks like Dota 2
    draw_banner(4242).save(d / "620.jpg", quality=95)
    fs = extract_features(d, recipe, tmp_path / "store", tiny_weights, progress=False)
    after = find_matches(fs, 3, precision="float32")
    fresh = find_matches(fs, 3, precision="float32", save=False)
    np.testing.assert_array_equal(after.neighbours, fresh.neighbours)
    assert after.of("227300")[0] == ("570", pytest.approx(1.0)) and before.of("227300")[0][0] != "570"
    bf16 = find_matches(fs, 3, precision="bfloat16")
    assert bf16.precision == "bfloat16" and bf16.path != after.path  # not answered from the fp32 file


def test_an_image_query_is_decoded_like_a_stored_banner(banner_dir, tiny_weights, tmp_path):
    """Bug: a PIL query went through .convert("RGB") (alpha over black, no EXIF rotation), a file through the
    banners' decoder (alpha over white, rotated): the same picture gave two answers."""
    fs = extract_features(banner_dir, _recipe(tiny_weights), tmp_path, tiny_weights, progress=False)
    rgba = Image.open(banner_dir / "220.jpg").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # half transparent
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90" orientation
    rgba.save(tmp_path / "query.png", exif=exif)
    from_file, from_pil = query(fs, [str(tmp_path / "query.png"), Image.open(tmp_path / "query.png")], k=5,
                                weights=tiny_weights)
    assert from_pil.matches == from_file.matches


@pytest.mark.parametrize("all_pairs", [True, False])
def test_bf16_search_equals_fp32_search_where_scores_are_closer_than_bf16_steps(all_pairs):
    """Series of near-copies (cosine 0.95-0.98): their scores differ by less than bf16's step there (1/256), so bf16
    alone ranks them by rounding. Rows the rounding bound cannot decide are settled in fp32: the lists are those of
    the fp32 search, index for index (which matches float64 brute force up to fp32's own near-ties)."""
    x = _clustered(3000, 128, 7)
    x = x[np.repeat(np.arange(60), 50)] + 0.02 * np.random.default_rng(8).standard_normal((3000, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    search = search_mod.top_k_all_pairs if all_pairs else lambda x, k, **kw: top_k(x, x, k, np.arange(len(x)), **kw)
    exact, exact_scores = search(x, 10, precision="float32")
    idx, scores = search(x, 10, precision="bfloat16")
    np.testing.assert_array_equal(idx, exact)
    np.testing.assert_array_equal(scores, exact_scores)
    assert np.mean(exact == _reference_top_k(x, 10)) > 0.999
