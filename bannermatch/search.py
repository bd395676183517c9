"""Search: exact cosine top-k, a block of rows at a time, never building the N x N similarity matrix.

Scores are exact fp32 dot products summed in one order for every pair, so duplicate banners tie exactly, and ties
are broken by index (lower first): results are the same on every run, whatever the blocking.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import BannermatchError
from .recipe import resolve_device

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16")
_CHUNK_BYTES = 256 << 20  # similarity block per step: bounds extra memory whatever N is
_RESCORE_EXTRA = 16  # bf16 keeps this many extra candidates (8 left 11% of the rows to settle in fp32: no faster)
# All-pairs product per step, rows x columns; None: as many rows as _CHUNK_BYTES allows against all the later ones
# (tiles of 1,024 x 4,096, kept in cache, ran 1.4x slower on 2 busy cores: BENCHMARKS.md run 8)
_TILE: tuple[int, int] | None = None
_TIE_EXTRA = 4  # fp32 keeps a few extra, so ties of up to this many duplicates at the k-th place settle at once
_FINISH_ROWS = 512  # the all-pairs search ranks its rows' candidates this many rows at a time (in cache)
_PAIRS = 2048  # candidate pairs the all-pairs search rescores at a time (512 ran 1.5x slower, threads waiting)
_GROUP = 8  # the all-pairs search reads each score once, as part of a column's maximum over this many rows
_FIRST_COLUMNS = 4096  # a tile's rows meet this many columns first, then twice as many, ... (see _widening)
_MANY_OFFERS = 8  # a row offered this many in one merge takes them in one top-k, not one by one


def _chunk_rows(n: int) -> int:
    return max(1, min(4096, _CHUNK_BYTES // (4 * max(n, 1))))


def _blocks(n: int, itemsize: int):
    """The all-pairs products, a block of rows at a time: ``(start, stop, [(col, end), ...])``, rows ``start:stop``
    against columns ``col:end`` (from ``start`` on: the pairs before were seen from the other side). As many rows
    as ``_CHUNK_BYTES`` holds against the columns left, so blocks grow as the triangle narrows (fewer, fuller steps),
    unless ``_TILE`` sets fixed tiles."""
    start = 0
    while start < n:
        rows = _CHUNK_BYTES // (itemsize * (n - start))
        block, width = _TILE or (max(1, rows // _GROUP * _GROUP if rows > _GROUP else rows), n - start)
        stop = min(start + block, n)
        yield start, stop, [(col, min(col + width, n)) for col in range(start, n, width)]
        start = stop


def _tile_size(n: int, itemsize: int) -> int:
    """Scores in the largest tile of :func:`_blocks`."""
    return _TILE[0] * _TILE[1] if _TILE else max(_CHUNK_BYTES // itemsize, n)


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


def _exact_scores(q: torch.Tensor, db: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """fp32 dot products of each row ``q[i]`` with its first ``lengths[i]`` candidates ``db[idx[i]]`` (all by
    default; -inf after), one candidate column at a time, each summed in the same order: identical banners score
    identically wherever they sit, which a matrix product does not promise (it rounds by position), so duplicates
    tie exactly. Rows go longest first, so each column's rows are a prefix, gathered into one buffer and multiplied
    in place (half the time of a fresh product per column)."""
    if lengths is None:
        lengths = torch.full((len(q),), idx.shape[1], device=q.device)
    lengths, order = torch.sort(lengths, descending=True)
    q, idx = q[order], idx[order]
    scores = torch.full(idx.shape, -torch.inf, device=q.device)
    buffer = torch.empty_like(q)
    for j, rows in enumerate((lengths[:, None] > torch.arange(idx.shape[1], device=q.device)).sum(dim=0).tolist()):
        torch.index_select(db, 0, idx[:rows, j], out=buffer[:rows])
        scores[:rows, j] = torch.sum(buffer[:rows].mul_(q[:rows]), dim=1)
    return torch.empty_like(scores).index_copy_(0, order, scores)


class _Rounding:
    """What bounds the distance between a product score (the search's float type) and the exact fp32 score of the
    same pair, measured once on the database: its largest norm, and after rounding to the search's type, its
    largest norm and largest rounding (and each row's, for the all-pairs search, whose queries are its rows)."""

    def __init__(self, db: torch.Tensor, db_search: torch.Tensor):
        self.dtype, self.d = db_search.dtype, db.shape[1]
        self.rows = torch.cat([self._norms(rows) for rows in db.split(4096)], dim=1)  # in pieces that stay in cache
        self.max_norm, self.max_norm_rounded, self.max_rounding = self.rows.max(dim=1).values

    def _norms(self, q: torch.Tensor) -> torch.Tensor:
        """``[3, len(q)]``: each row's norm, its norm once rounded to the search's type, and the rounding's norm."""
        rounded = q.to(self.dtype).float()
        return torch.stack([q.norm(dim=1), rounded.norm(dim=1), (rounded - q).norm(dim=1)])

    def bound(self, q: torch.Tensor | None = None) -> torch.Tensor:
        """Per row of ``q`` (default: the database's own rows): |product - exact| for any database row, by the
        triangle inequality over the steps: each side rounded (|q~ - q| |c~| + |q| |c~ - c|), fp32 sums in any order
        (d * 2^-24 * |q| * |c|, for the product and for the exact score), and a bf16 result rounded once more (half
        a step: 2^-8 of it). 1% on top covers the rounding of this sum itself."""
        n_q, n_rounded, rounding = self.rows if q is None else self._norms(q)
        result = 2.0 ** -8 if self.dtype == torch.bfloat16 else 0.0
        sums = self.d * 2.0 ** -24 * (n_rounded * self.max_norm_rounded + n_q * self.max_norm)
        return 1.01 * (result * n_rounded * self.max_norm_rounded + rounding * self.max_norm_rounded
                       + n_q * self.max_rounding + sums)

    def fp32_bound(self, q: torch.Tensor) -> torch.Tensor:
        """The same for fp32 products: the two sums' bounds alone."""
        return 1.01 * 2 * q.shape[1] * 2.0 ** -24 * q.norm(dim=1) * self.max_norm


def _rescored(vals: torch.Tensor, k: int, bound: torch.Tensor) -> torch.Tensor:
    """How many of each row's candidates, by product score (``vals``, descending), get an exact score: those within
    twice the rounding ``bound`` of the k-th best (see :func:`_finish`)."""
    return (vals >= (vals[:, k - 1] - 2 * bound)[:, None]).sum(dim=1)


def _finish(q, db, vals, idx, k, rounding: _Rounding, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """The final k of each row's candidates, by exact score (descending), then index (ascending).

    ``vals`` are the product scores the candidates were chosen by; every other banner's product score is at most
    their lowest. Only candidates whose product score is within twice the rounding bound of the k-th best are
    rescored: the k best products are exact within one bound of it, so the others cannot reach the top k. A row
    whose k-th exact score is not clear of the lowest candidate's product score by the bound, so that a banner
    outside the candidates could still tie or beat it (duplicates, or scores closer than bf16's steps), is settled
    on its whole row: the lists are those of fp32 brute force in either precision.
    """
    vals, order = torch.sort(vals.float(), dim=1, descending=True)
    idx, bound = idx.gather(1, order), rounding.bound(q)
    scores = _exact_scores(q, db, idx, _rescored(vals, k, bound))
    return _settled(q, db, *_ranked(vals, idx, scores, bound, k, exclude), k, rounding, exclude)


def _ranked(vals, idx, scores, bound, k, exclude=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates (by product score ``vals``, descending) by exact ``scores``, then index: ``(idx, scores,
    unsure)``, ``unsure`` the rows :func:`_settle` must see (see :func:`_finish`)."""
    if exclude is not None:
        scores[idx == exclude[:, None]] = -torch.inf
    scores, idx = _lexsort_topk(scores, idx, idx.shape[1])
    return idx, scores, torch.nonzero(scores[:, k - 1] <= vals.min(dim=1).values + bound).flatten()


def _settled(q, db, idx, scores, unsure, k, rounding: _Rounding, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """The final k of each row: as ranked, the ``unsure`` rows settled on their whole row, all in one pass (a row
    alone reads the whole database for one row's products)."""
    if len(unsure):
        ex = exclude[unsure] if exclude is not None else None
        scores[unsure, :k], idx[unsure, :k] = _settle(q[unsure], db, scores[unsure], idx[unsure], k, rounding, ex)
    return idx[:, :k].cpu().numpy(), scores[:, :k].cpu().numpy()


def _pair_scores(x: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """:func:`_exact_scores` of every row of ``x`` against its first ``lengths`` candidates ``idx``, for the
    all-pairs search: each unordered pair once. Neighbours are mostly each other's candidates (half the pairs, on
    clustered features), and ``x[a] * x[b]`` are the products of ``x[b] * x[a]``, summed in the same order, so one
    score serves both rows, bit for bit. Pairs go by their lower row, whose vector stays in cache."""
    n = len(x)
    wanted = torch.arange(idx.shape[1], device=x.device) < lengths[:, None]
    rows, cands = torch.arange(n, device=x.device)[:, None].expand_as(idx)[wanted], idx[wanted]
    pairs, each = torch.unique(torch.minimum(rows, cands) * n + torch.maximum(rows, cands), return_inverse=True)
    pair_scores = torch.empty(len(pairs), device=x.device)

    def score(start: int) -> None:
        chunk = pairs[start:start + _PAIRS]
        high, low = (torch.index_select(x, 0, rows) for rows in (chunk % n, chunk // n))
        pair_scores[start:start + len(chunk)] = torch.sum(high.mul_(low), dim=1)  # as _exact_scores sums

    _side_by_side(score, range(0, len(pairs), _PAIRS))
    scores = torch.full(idx.shape, -torch.inf, device=x.device)
    scores[wanted] = pair_scores[each]
    return scores


def _settle(q, db, scores, candidates, k, rounding: _Rounding, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of some rows against the whole database, given their candidates' exact ``scores`` (descending):
    every banner whose fp32 product score comes within the fp32 rounding bound of the row's k-th exact score so far
    joins them, rescored exactly (fp32 products here, even after a bf16 search: their bound is 100 times tighter,
    so few banners are new)."""
    out_scores = torch.empty(len(q), k, device=q.device)
    out_idx = torch.empty(len(q), k, dtype=torch.int64, device=q.device)
    n, step = len(db), _chunk_rows(len(db))
    for start in range(0, len(q), step):
        rows = torch.arange(start, min(start + step, len(q)), device=q.device)
        sims = _similarities(q[rows], db)
        r, c = torch.nonzero(sims >= (scores[rows, k - 1] - rounding.fp32_bound(q[rows]))[:, None], as_tuple=True)
        del sims
        known = ((rows[:, None] - start) * n + candidates[rows])[scores[rows] > -torch.inf]  # rescored already
        new = r * n + c
        new = new[~torch.isin(new, known)]
        r, c = new // n, new % n
        new_scores = (q[rows][r] * db[c]).sum(dim=1)  # as _exact_scores sums: duplicates tie exactly
        if exclude is not None:
            new_scores[c == exclude[rows][r]] = -torch.inf
        r = torch.cat([torch.arange(len(rows), device=q.device).repeat_interleave(candidates.shape[1]), r])
        c = torch.cat([candidates[rows].flatten(), c])
        all_scores = torch.cat([scores[rows].flatten(), new_scores])
        order = torch.argsort(c, stable=True)
        order = order[torch.argsort(all_scores[order], descending=True, stable=True)]
        order = order[torch.argsort(r[order], stable=True)]  # by row, then score (descending), then index
        first = torch.searchsorted(r[order], torch.arange(len(rows), device=q.device))
        at = order[first[:, None] + torch.arange(k, device=q.device)]
        out_scores[rows], out_idx[rows] = all_scores[at], c[at]
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
    rounding = _Rounding(db, db_search)
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
        out_idx[start:start + len(q)], out_val[start:start + len(q)] = _finish(q, db, vals, idx, k, rounding, ex)
    return out_idx, out_val


def _argsort(key: torch.Tensor) -> torch.Tensor:
    """An argsort; on CPU through numpy, whose int64 sort (x86-simd-sort) ran 5x faster than torch's two stable sorts
    it replaces. Which of two equal offers to a row is kept does not matter: ties are settled exactly later."""
    if key.device.type == "cpu":
        return torch.from_numpy(np.argsort(key.numpy()))
    return torch.argsort(key)


def _merge_pairs(best_val, best_idx, rows, cands, vals, grouped: bool = False) -> None:
    """Merge scattered candidates (``cands[e]`` scoring ``vals[e]`` for row ``rows[e]``) into the running lists,
    in place. Each row's offers are put together, best first (``grouped``: they are already), by one sort by row,
    then score (descending, as an integer: the float's bits, negatives after positives); then each core merges a
    range of rows (:func:`_merge_rows`: rows do not share lists, and torch lets go of the GIL)."""
    if not len(rows):
        return
    if not grouped:
        bits = vals.float().view(torch.int32).to(torch.int64)
        falling = torch.where(bits < 0, bits + (1 << 32), bits ^ 0x7FFFFFFF)  # in [0, 2^32), grows as the score falls
        order = _argsort(rows * (1 << 32) + falling)
        rows, cands, vals = rows[order], cands[order], vals[order]
    cuts = [0] + [int(torch.searchsorted(rows, rows[len(rows) * i // _cores()])) for i in range(1, _cores())]
    _side_by_side(lambda start, stop: _merge_rows(best_val, best_idx, rows[start:stop], cands[start:stop],
                                                  vals[start:stop]), cuts, cuts[1:] + [len(rows)])


def _merge_rows(best_val, best_idx, rows, cands, vals) -> None:
    """:func:`_merge_pairs` for offers grouped by row, best first. A row offered many takes its best ones beside
    its list in one top-k; the others, in rounds, take their next best in place of the lowest of their list if
    higher (most are offered one or two: a top-k over a padded row costs them 3x)."""
    if not len(rows):
        return
    first = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    first[1:] = rows[1:] != rows[:-1]
    starts = torch.nonzero(first).flatten()
    counts = torch.diff(starts, append=starts.new_tensor([len(rows)]))
    width = best_val.shape[1]
    many = counts >= _MANY_OFFERS
    if bool(many.any()):
        lane = torch.arange(width, device=rows.device)
        first_offer, n_offers = starts[many], counts[many]
        valid = lane < n_offers[:, None]
        at = torch.where(valid, first_offer[:, None] + lane, 0)
        row = rows[first_offer]
        both_val = torch.cat([best_val[row], torch.where(valid, vals[at].float(), -torch.inf)], dim=1)
        both_idx = torch.cat([best_idx[row], torch.where(valid, cands[at], -1)], dim=1)
        best_val[row], kept = torch.topk(both_val, width, dim=1)
        best_idx[row] = both_idx.gather(1, kept)
        starts, counts = starts[~many], counts[~many]
    for j in range(int(counts.max()) if len(counts) else 0):
        at = starts[counts > j] + j
        row = rows[at]
        low, slot = best_val[row].min(dim=1)
        score = vals[at].float()
        better = torch.nonzero(score > low).flatten()
        row, slot = row[better], slot[better]
        best_val[row, slot], best_idx[row, slot] = score[better], cands[at[better]]


def _best_offers(targets: np.ndarray, sources: np.ndarray, bits: np.ndarray, keep: int) -> tuple:
    """Of offers ``(target, source, score)``, any order, each target's ``keep`` best, by target, best first: all a
    list of ``keep`` could take from them (of equal scores, any: ties are settled exactly later). One sort of packed
    keys (target, score falling, source); the scores are positive bf16 as int16 bits, which order as their floats."""
    key = (targets.astype(np.int64) << 40) | ((0x7FFF - bits.astype(np.int64)) << 24) | sources
    key.sort()
    targets = key >> 40
    first = np.ones(len(key), bool)
    first[1:] = targets[1:] != targets[:-1]
    at = np.arange(len(key))
    key = key[at - np.maximum.accumulate(np.where(first, at, 0)) < keep]  # rank within its target
    return key >> 40, key & 0xFFFFFF, (0x7FFF - ((key >> 24) & 0xFFFF)).astype(np.int16)


def _above(scores: torch.Tensor, kth_rows: torch.Tensor, kth_cols: torch.Tensor, keep: int | None = None
           ) -> tuple[list, list, bool]:
    """The scores strictly above their row's threshold, and those strictly above their column's (finite
    thresholds): ``(row_parts, column_parts, grouped)``, parts of ``(rows, columns, scores)``. With ``keep``, where
    the scores are bf16 on CPU, each part holds only each row's (column's) ``keep`` best of them, by row (column),
    best first (``grouped``): a list of ``keep`` takes nothing else, and the merge need not sort.

    Reading the tile is the cost (it is in memory, not in cache), so it is read once: each column's maximum over
    ``_GROUP`` rows at a time (torch: 4x numpy's), compared with the lower of the group's lowest row threshold and
    the column's; only the few groups above are looked at score by score, in numpy on every core (numpy lets go of
    the GIL; torch's compare and nonzero took 5-8 ns a score, numpy's 0.5-0.9). A bf16 score is read as its int16
    bits, which order positive values as their floats do."""
    kth_rows, kth_cols = kth_rows.to(scores.dtype), kth_cols.to(scores.dtype)
    if scores.device.type != "cpu" or (scores.dtype == torch.bfloat16 and not bool((kth_rows > 0).all()
                                                                                   and (kth_cols > 0).all())):
        found = []
        for r, c in (torch.nonzero(scores > kth_rows[:, None], as_tuple=True),
                     torch.nonzero(scores > kth_cols[None, :], as_tuple=True)):
            found.append([(r, c, scores[r, c])])
        return found[0], found[1], False
    as_bits = scores.dtype == torch.bfloat16
    if as_bits:
        scores, kth_rows, kth_cols = (t.view(torch.int16) for t in (scores, kth_rows, kth_cols))
    n_rows, width = scores.shape
    keep = keep if as_bits and max(n_rows, width) < 1 << 23 else None  # the packed keys' room
    grouped = n_rows // _GROUP * _GROUP
    maxima = scores[:grouped].view(-1, _GROUP, width).amax(dim=1).numpy()
    s, t_rows, t_cols = scores.numpy(), kth_rows.numpy(), kth_cols.numpy()
    boxes, box_thresholds = s[:grouped].reshape(-1, _GROUP, width), t_rows[:grouped].reshape(-1, _GROUP)

    def best(row_hits: tuple, col_hits: tuple) -> list:
        if keep is None:
            return [row_hits, col_hits]
        rows, cols, values = _best_offers(*row_hits, keep)
        found_cols, found_rows, col_values = _best_offers(col_hits[1], col_hits[0], col_hits[2], keep)
        return [(rows, cols, values), (found_rows, found_cols, col_values)]

    def groups_above(first: int, last: int) -> list:
        thresholds = box_thresholds[first:last].copy()  # these rows': raised as their best so far fill up
        found_rows, found_cols = [], []
        for start, stop in _widening(width, keep is not None):
            lowest = np.minimum(thresholds.min(axis=1)[:, None], t_cols[None, start:stop])
            group, col = np.divmod(np.flatnonzero(maxima[first:last, start:stop] > lowest), stop - start)
            col += start
            values = boxes[group + first, :, col]  # [hits, _GROUP]
            for found, above in ((found_rows, values > thresholds[group]), (found_cols, values > t_cols[col][:, None])):
                hit, lane = np.divmod(np.flatnonzero(above), _GROUP)
                found.append(((group[hit] + first) * _GROUP + lane, col[hit], values[hit, lane]))
            if keep is not None:  # each row's best so far; a row holding keep of them needs no less from now on
                found_rows[:] = [_best_offers(*(np.concatenate(part) for part in zip(*found_rows)), keep)]
                rows, _, values = found_rows[0]
                last_of_row = np.flatnonzero(np.append(rows[1:] != rows[:-1], True))
                full = last_of_row[np.diff(last_of_row, prepend=-1) == keep]
                raised = thresholds.reshape(-1)  # a view
                at = rows[full] - first * _GROUP
                raised[at] = np.maximum(raised[at], values[full])
        return best(*(tuple(np.concatenate(part) for part in zip(*found)) for found in (found_rows, found_cols)))

    cuts = [len(boxes) * i // _cores() for i in range(_cores() + 1)]
    parts = _side_by_side(groups_above, cuts, cuts[1:])
    if grouped < n_rows:  # the last rows, if not a whole group, one score at a time
        rest, found = s[grouped:], []
        for thresholds in (t_rows[grouped:, None], t_cols[None, :]):
            r, c = np.nonzero(rest > thresholds)
            found.append((r + grouped, c, rest[r, c]))
        parts.append(best(*found))

    def as_tensors(rows, cols, values) -> tuple:
        values = torch.from_numpy(values)
        return torch.from_numpy(rows), torch.from_numpy(cols), values.view(torch.bfloat16) if as_bits else values

    row_parts = [as_tensors(*(np.concatenate([part[0][i] for part in parts]) for i in range(3)))]  # by row still
    if keep is None:
        return row_parts, [as_tensors(*(np.concatenate([part[1][i] for part in parts]) for i in range(3)))], False
    return row_parts, [as_tensors(*part[1]) for part in parts], True


def _widening(width: int, widen: bool) -> list[tuple[int, int]]:
    """The column ranges a tile's rows are scanned in: doubling from ``_FIRST_COLUMNS`` (``widen``), so that a row's
    threshold rises with the best it has met so far, or all at once."""
    stops = [_FIRST_COLUMNS << i for i in range(max(0, (width - 1) // _FIRST_COLUMNS).bit_length())] if widen else []
    return list(zip([0] + stops, stops + [width]))


def _cores() -> int:
    return max(1, torch.get_num_threads())


def _side_by_side(fn, *iterables) -> list:
    """``fn`` over ``iterables`` on as many threads as torch uses (numpy and torch let go of the GIL)."""
    return list(_threads(_cores()).map(fn, *iterables))


@functools.cache
def _threads(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="bannermatch-search")


def _tile_candidates(sims, kth_rows, kth_cols, row0: int, col0: int, own: int, n_cand: int) -> list:
    """What a tile of products (rows ``row0:`` against columns ``col0:``) offers the running lists, as batches of
    ``(row, candidate, score, grouped)`` for :func:`_merge_pairs`: to each row, its scores above the row's k'-th
    score so far; to each column's own row, likewise, except for the first ``own`` columns (the tile's own rows: a
    pair in that square reaches both rows through the row direction). Strictly above: a tie cannot enter a list it
    would not improve (a full list of equal scores is settled exactly later), and a tile of identical banners offers
    nothing. While a list is not yet full (its k'-th score is -inf), a top-k over the tile takes the threshold's
    place."""
    dev = sims.device
    kth_cols = kth_cols.clone()
    kth_cols[:own] = torch.inf  # the square: through the row direction only
    if not (torch.isinf(kth_rows).any() or torch.isinf(kth_cols[own:]).any()):
        row_parts, col_parts, grouped = _above(sims, kth_rows, kth_cols, n_cand)
        return ([(r.to(dev) + row0, c.to(dev) + col0, v.to(dev), grouped) for r, c, v in row_parts]
                + [(c.to(dev) + col0, r.to(dev) + row0, v.to(dev), grouped) for r, c, v in col_parts])
    found = []
    for scores, axis, first, other in ((sims, 0, row0, col0), (sims[:, own:], 1, col0 + own, row0)):
        if scores.numel():  # each row's (column's) best, best first: grouped
            vals, at = torch.topk(scores, min(n_cand, scores.shape[1 - axis]), dim=1 - axis)
            vals, at = (vals.T, at.T) if axis else (vals, at)
            mine = torch.arange(scores.shape[axis], device=dev)[:, None].expand_as(at)
            found.append((mine.flatten() + first, at.flatten() + other, vals.flatten(), True))
    return found


def top_k_all_pairs(
    features: np.ndarray | torch.Tensor, k: int, device: str | None = None, precision: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best matches of every row among the other rows: ``top_k(x, x, k, exclude=arange(N))``, in half
    the time.

    Similarity is symmetric, so a block of rows is multiplied only with itself and the rows after it, and gives
    the later rows their candidates from the block (a column of the product). Selecting them, not the product,
    bounded the search (a row-wise and a column-wise top-k over every score), so each score is only compared with
    the k'-th score so far of its row and of its column (in numpy, reading it once: see :func:`_above`): the few
    above go to that row's list, the rest is never touched again. Lists only improve, so a score that could not
    enter then could not enter later either: the candidates are those of a top-k over each whole row.
    """
    dev = resolve_device(device)
    x = torch.as_tensor(features, dtype=torch.float32).to(dev)
    n = len(x)
    _check_search(precision, k, n - 1)
    x_search = x.to(torch.bfloat16) if precision == "bfloat16" else x
    rounding = _Rounding(x, x_search)
    n_cand = _n_candidates(k, precision, n - 1)
    best_val = torch.full((n, n_cand), -torch.inf, device=dev)
    best_idx = torch.full((n, n_cand), -1, dtype=torch.int64, device=dev)
    size = _tile_size(n, x_search.element_size())
    buffer = torch.empty(size, dtype=x_search.dtype, device=dev)
    for start, stop, tiles in _blocks(n, x_search.element_size()):
        kth = best_val[start:].min(dim=1).values  # the later lists as they were before this block (merged at its end)
        offers = []
        for col, end in tiles:
            sims = _similarities(x[start:stop], x_search[col:end], buffer)
            own = max(0, min(stop, end) - col)  # columns that are also rows of this block
            same = torch.arange(max(col, start), max(col, min(stop, end)), device=dev)  # both row and column here
            sims[same - start, same - col] = -torch.inf  # itself
            offers += _tile_candidates(sims, kth[:stop - start], kth[col - start:end - start], start, col, own, n_cand)
        for rows, cands, vals, grouped in offers:
            _merge_pairs(best_val, best_idx, rows, cands, vals, grouped)
    vals, order = torch.sort(best_val, dim=1, descending=True)
    idx = best_idx.gather(1, order)
    bound = rounding.bound()
    scores = _pair_scores(x, idx, _rescored(vals, k, bound))
    unsure = []

    def rank(start: int) -> None:
        rows = slice(start, start + _FINISH_ROWS)
        idx[rows], scores[rows], rows_unsure = _ranked(vals[rows], idx[rows], scores[rows], bound[rows], k,
                                                       torch.arange(start, min(start + _FINISH_ROWS, n), device=dev))
        unsure.append(rows_unsure + start)

    _side_by_side(rank, range(0, n, _FINISH_ROWS))  # chunks side by side: torch lets go of the GIL
    return _settled(x, x, idx, scores, torch.cat(unsure), k, rounding, torch.arange(n, device=dev))


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
