"""Search: exact cosine top-k, a block of rows at a time, never building the N x N similarity matrix.

Scores are exact fp32 dot products summed in one order for every pair, so duplicate banners tie exactly, and ties
are broken by index (lower first): results are the same on every run, whatever the blocking.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import BannermatchError
from .recipe import resolve_device

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16")
_CHUNK_BYTES = 256 << 20  # similarity block per step: bounds extra memory whatever N is
_RESCORE_EXTRA = 16  # bf16 search keeps this many extra candidates, then rescores them in fp32
# All-pairs product per step, rows x columns; None: as many rows as _CHUNK_BYTES allows against all the later ones
# (tiles of 1,024 x 4,096, kept in cache, ran 1.4x slower on 2 busy cores: BENCHMARKS.md run 8)
_TILE: tuple[int, int] | None = None
_TIE_EXTRA = 4  # fp32 keeps a few extra, so ties of up to this many duplicates at the k-th place settle at once


def _chunk_rows(n: int) -> int:
    return max(1, min(4096, _CHUNK_BYTES // (4 * max(n, 1))))


def _tile(n: int) -> tuple[int, int]:
    return _TILE or (_chunk_rows(n), n)


def _similarities(q: torch.Tensor, db: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """``q @ db.T``, written into ``buffer`` (flat, at least that large) when given: a fresh block of hundreds of
    MB costs its page faults again on every step. On CPU in float32 through numpy, whose OpenBLAS sgemm ran 1.4x
    faster than torch's MKL on the AMD CPU of BENCHMARKS.md (the same BLAS faiss uses)."""
    out = None if buffer is None else buffer[:len(q) * len(db)].view(len(q), len(db))
    if db.device.type == "cpu" and db.dtype == torch.float32:
        if out is None:
            return torch.from_numpy(q.numpy() @ db.numpy().T)
        np.matmul(q.numpy(), db.numpy().T, out=out.numpy())
        return out
    return torch.matmul(q.to(db.dtype), db.T, out=out)


def _lexsort_topk(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order candidates by (score desc, index asc) and keep k."""
    by_idx = torch.sort(idx, dim=1, stable=True).indices
    vals, idx = vals.gather(1, by_idx), idx.gather(1, by_idx)
    by_val = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, by_val)[:, :k], idx.gather(1, by_val)[:, :k]


def _check_search(precision: str, k: int, n: int) -> None:
    if precision not in PRECISIONS:
        raise BannermatchError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if k > n:
        raise BannermatchError(f"k={k} is larger than the {n} banners there are to match")
    if k < 1:
        raise BannermatchError("k must be at least 1")


def _n_candidates(k: int, precision: str, n: int) -> int:
    return min(k + (_RESCORE_EXTRA if precision == "bfloat16" else _TIE_EXTRA), n)


def _exact_scores(q: torch.Tensor, db: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """fp32 dot products of each row ``q[i]`` with its candidates ``db[idx[i]]``, one candidate column at a time
    (memory: one [n, d] block), each summed in the same order: identical banners score identically wherever they
    sit, which a matrix product does not promise (it rounds by position), so duplicates tie exactly."""
    return torch.stack([(q * db[idx[:, j]]).sum(dim=1) for j in range(idx.shape[1])], dim=1)


def _error_bound(q: torch.Tensor, db_max_norm: torch.Tensor) -> torch.Tensor:
    """Per row, how far a product score and an exact score of the same pair can differ: twice the fp32 bound
    d * 2^-24 * |q| * |c| of any summation order."""
    return 2 * q.shape[1] * 2.0 ** -24 * q.norm(dim=1) * db_max_norm


def _finish(q, db, vals, idx, k, precision, db_max_norm, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """The final k of each row's candidates, by exact score (descending), then index (ascending).

    ``vals`` are the product scores the candidates were chosen by. fp32 rows whose k-th exact score is not clear
    of the last candidate's product score by the rounding bound, so that a banner outside the candidates could
    still tie or beat it (duplicates), are settled on their whole row; bf16 candidates are approximate by design,
    and only a tie at the k-th place among them is settled.
    """
    scores = _exact_scores(q, db, idx)
    if exclude is not None:
        scores[idx == exclude[:, None]] = -torch.inf
    scores, idx = _lexsort_topk(scores, idx, idx.shape[1])
    if idx.shape[1] > k:
        if precision == "bfloat16":
            unsure = scores[:, k - 1] == scores[:, k]
        else:
            unsure = scores[:, k - 1] <= vals.float().min(dim=1).values + _error_bound(q, db_max_norm)
        rows = torch.nonzero(unsure).flatten()
        if len(rows):
            ex = exclude[rows] if exclude is not None else None
            scores[rows, :k], idx[rows, :k] = _settle(q[rows], db, scores[rows, k - 1], idx[rows], k, db_max_norm, ex)
    return idx[:, :k].cpu().numpy(), scores[:, :k].cpu().numpy()


def _settle(q, db, kth, candidates, k, db_max_norm, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a few rows against the whole database: every banner whose product score comes within the
    rounding bound of the row's k-th exact score so far is rescored exactly."""
    out_scores = torch.empty(len(q), k, device=q.device)
    out_idx = torch.empty(len(q), k, dtype=torch.int64, device=q.device)
    step = _chunk_rows(db.shape[0])
    for start in range(0, len(q), step):
        sims = _similarities(q[start:start + step], db)
        bound = _error_bound(q[start:start + step], db_max_norm)
        for r in range(len(sims)):
            row = start + r
            near = torch.nonzero(sims[r] >= kth[row] - bound[r]).flatten()
            cand = torch.unique(torch.cat([near, candidates[row]]))
            scores = _exact_scores(q[row:row + 1], db, cand[None])[0]
            if exclude is not None:
                scores[cand == exclude[row]] = -torch.inf
            s, i = _lexsort_topk(scores[None], cand[None], k)
            out_scores[row], out_idx[row] = s[0], i[0]
    return out_scores, out_idx


def top_k(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor,
    k: int,
    exclude: np.ndarray | None = None,
    device: str | None = None,
    precision: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the ``k`` database rows of highest dot product: ``(indices int64, scores float32)``.

    ``exclude[i]`` is a database index that query ``i`` may not match (itself), or -1. For all against all, use
    :func:`top_k_all_pairs`, which does half the work.
    """
    dev = resolve_device(device)
    db = torch.as_tensor(database, dtype=torch.float32).to(dev)
    q_all = torch.as_tensor(queries, dtype=torch.float32)
    _check_search(precision, k, db.shape[0] - (1 if exclude is not None else 0))
    db_search = db.to(torch.bfloat16) if precision == "bfloat16" else db
    db_max_norm = db.norm(dim=1).max()
    n_cand = _n_candidates(k, precision, db.shape[0])
    out_idx = np.empty((len(q_all), k), np.int64)
    out_val = np.empty((len(q_all), k), np.float32)
    step = _chunk_rows(db.shape[0])
    for start in range(0, len(q_all), step):
        q = q_all[start:start + step].to(dev)
        sims = _similarities(q, db_search)
        ex = None
        if exclude is not None:
            ex = torch.as_tensor(exclude[start:start + step], device=dev)
            valid = ex >= 0
            sims[torch.arange(len(q), device=dev)[valid], ex[valid]] = -torch.inf
        vals, idx = torch.topk(sims, n_cand, dim=1)
        del sims
        out_idx[start:start + len(q)], out_val[start:start + len(q)] = _finish(q, db, vals, idx, k, precision,
                                                                                db_max_norm, ex)
    return out_idx, out_val


def _merge(vals, idx, new_vals, new_idx) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``vals.shape[1]`` of two candidate lists per row."""
    best, at = torch.topk(torch.cat([vals, new_vals.float()], 1), vals.shape[1], dim=1)
    return best, torch.cat([idx, new_idx], 1).gather(1, at)


def _merge_pairs(best_val, best_idx, rows, cands, vals) -> None:
    """Merge scattered candidates (``cands[e]`` scoring ``vals[e]`` for row ``rows[e]``) into the running lists,
    in place: each touched row's best new candidates (as many as a list holds: a row can be offered thousands
    while its list is far from final) are packed into one padded row, then merged as a block."""
    if not len(rows):
        return
    by_score = torch.argsort(vals.float(), descending=True, stable=True)
    rows, order = torch.sort(rows[by_score], stable=True)  # each row's candidates together, best first
    order = by_score[order]
    touched, counts = torch.unique_consecutive(rows, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(touched), device=rows.device), counts)
    slot = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[group]
    keep = slot < best_val.shape[1]
    width = min(int(counts.max()), best_val.shape[1])
    new_val = torch.full((len(touched), width), -torch.inf, device=rows.device)
    new_idx = torch.full((len(touched), width), -1, dtype=torch.int64, device=rows.device)
    new_val[group[keep], slot[keep]] = vals[order[keep]].float()
    new_idx[group[keep], slot[keep]] = cands[order[keep]]
    best_val[touched], best_idx[touched] = _merge(best_val[touched], best_idx[touched], new_val, new_idx)


def _above(scores: torch.Tensor, kth: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, column)`` of the scores strictly above ``kth`` of their row (``axis`` 0) or column (1), a finite
    threshold each. On CPU through numpy: torch's broadcast compare and nonzero took 5-8 ns a score on 2 busy
    cores, numpy's 0.5-0.9 (the bf16 product itself: about 5 at that load); a bf16 score is compared as its int16
    bits, which order positive values as their floats do."""
    kth = kth.to(scores.dtype)
    if scores.device.type != "cpu" or (scores.dtype == torch.bfloat16 and not bool((kth > 0).all())):
        return torch.nonzero(scores > (kth[:, None] if axis == 0 else kth[None, :]), as_tuple=True)
    if scores.dtype == torch.bfloat16:
        scores, kth = scores.view(torch.int16), kth.view(torch.int16)
    s, t = scores.numpy(), kth.numpy()
    flat = np.flatnonzero(np.greater(s, t[:, None] if axis == 0 else t[None, :]))
    return torch.from_numpy(flat // s.shape[1]), torch.from_numpy(flat % s.shape[1])


def _tile_candidates(sims, kth_rows, kth_cols, row0: int, col0: int, own: int, n_cand: int) -> list:
    """What a tile of products (rows ``row0:`` against columns ``col0:``) offers the running lists, as
    ``(row, candidate, score)`` parts: to each row, its scores above the row's k'-th score so far; to each
    column's own row, likewise, except for the first ``own`` columns (the tile's own rows: a pair in that square
    reaches both rows through the row direction). Strictly above: a tie cannot enter a list it would not improve
    (a full list of equal scores is settled exactly later), and a tile of identical banners offers nothing. While a
    list is not yet full (its k'-th score is -inf), a top-k over the tile takes the threshold's place."""
    found = []
    cols = sims[:, own:]
    for scores, kth, axis, first, other in ((sims, kth_rows, 0, row0, col0), (cols, kth_cols[own:], 1, col0 + own, row0)):
        if not scores.numel():
            continue
        if torch.isinf(kth).any():
            vals, at = torch.topk(scores, min(n_cand, scores.shape[1 - axis]), dim=1 - axis)
            mine = torch.arange(len(kth), device=sims.device).expand_as(at) if axis else \
                torch.arange(len(kth), device=sims.device)[:, None].expand_as(at)
            found.append((mine.flatten() + first, at.flatten() + other, vals.flatten()))
        else:
            r, c = _above(scores, kth, axis)
            mine, theirs = (r, c) if axis == 0 else (c, r)
            found.append((mine.to(sims.device) + first, theirs.to(sims.device) + other, scores[r, c]))
    return found


def top_k_all_pairs(
    features: np.ndarray | torch.Tensor, k: int, device: str | None = None, precision: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best matches of every row among the other rows: ``top_k(x, x, k, exclude=arange(N))``, in half
    the time.

    Similarity is symmetric, so a block of rows is multiplied only with itself and the rows after it, and gives
    the later rows their candidates from the block (a column of the product). Selecting them, not the product,
    bounded the search (a row-wise and a column-wise top-k over every score), so once a row's list is full, each
    score is only compared with the k'-th score so far of its row and of its column (in numpy: see
    :func:`_above`): the few above go to that row's list, the rest is never touched again. Lists only improve, so
    a score that could not enter then could not enter later either: the candidates are those of a top-k over
    each whole row.
    """
    dev = resolve_device(device)
    x = torch.as_tensor(features, dtype=torch.float32).to(dev)
    n = len(x)
    _check_search(precision, k, n - 1)
    x_search = x.to(torch.bfloat16) if precision == "bfloat16" else x
    db_max_norm = x.norm(dim=1).max()
    n_cand = _n_candidates(k, precision, n - 1)
    best_val = torch.full((n, n_cand), -torch.inf, device=dev)
    best_idx = torch.full((n, n_cand), -1, dtype=torch.int64, device=dev)
    block, width = _tile(n)
    buffer = torch.empty(block * width, dtype=x_search.dtype, device=dev)
    for start in range(0, n, block):
        stop = min(start + block, n)
        kth = best_val[:, -1].clone()  # the lists as they were before this block: merged once, at its end
        found = []
        for col in range(start, n, width):
            end = min(col + width, n)
            sims = _similarities(x[start:stop], x_search[col:end], buffer)
            own = max(0, min(stop, end) - col)  # columns that are also rows of this block
            same = torch.arange(max(col, start), max(col, min(stop, end)), device=dev)  # both row and column here
            sims[same - start, same - col] = -torch.inf  # itself
            found += _tile_candidates(sims, kth[start:stop], kth[col:end], start, col, own, n_cand)
        _merge_pairs(best_val, best_idx, *(torch.cat(part) for part in zip(*found)))
    out_idx = np.empty((n, k), np.int64)
    out_val = np.empty((n, k), np.float32)
    for start in range(0, n, _chunk_rows(n)):
        rows = torch.arange(start, min(start + _chunk_rows(n), n), device=dev)
        out_idx[start:start + len(rows)], out_val[start:start + len(rows)] = _finish(
            x[rows], x, best_val[rows], best_idx[rows], k, precision, db_max_norm, rows)
    return out_idx, out_val


#: faiss HNSW graph: links per banner, and candidates kept while building and searching (more: slower, better
#: recall; recall@10 against exact search per N is in BENCHMARKS.md)
HNSW_LINKS, HNSW_BUILD, HNSW_SEARCH = 32, 80, 128


def top_k_faiss(queries, database, k, exclude=None, approximate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The same search with faiss (optional extra ``[faiss]``): ``IndexFlatIP``, exact, or with ``approximate``
    an HNSW graph (``IndexHNSWFlat``), which visits a few thousand banners per query instead of all of them:
    time grows about as N log N instead of N^2, at a recall below 1 (duplicates' ties are not settled either)."""
    try:
        import faiss
    except ImportError:
        raise BannermatchError("the faiss backends need: pip install 'bannermatch[faiss]'") from None
    database = np.ascontiguousarray(database, dtype=np.float32)
    if approximate:
        index = faiss.IndexHNSWFlat(database.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_BUILD
        index.hnsw.efSearch = max(HNSW_SEARCH, k + 1)
    else:
        index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    extra = 1 if exclude is not None else 0
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, idx = index.search(queries, k + extra)
    if approximate and (short := np.flatnonzero((idx < 0).any(axis=1))).size:  # the graph found too few (-1)
        exact = faiss.IndexFlatIP(database.shape[1])
        exact.add(database)
        scores[short], idx[short] = exact.search(queries[short], k + extra)
    if exclude is None:
        return idx.astype(np.int64), scores
    keep = idx != np.asarray(exclude)[:, None]
    keep[keep.sum(1) > k, -1] = False  # self was not among the candidates: drop the last one instead
    return idx[keep].reshape(len(idx), k).astype(np.int64), scores[keep].reshape(len(idx), k)
