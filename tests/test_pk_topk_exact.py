"""CPU pk_topk, exact: scores and indices bit for bit, ties included.

Inputs are dyadic (small integers times a power of two) and representable in every input
dtype, so every half-score, in float32 and in float64, and every pair sum is exact: the
kernel has no rounding to hide behind, and its answer must equal a float64 brute force
over all n_keys^2 pairs sorted by score descending, then index ascending (the documented
rule: the tied sums here always come from exact, hence tied-or-distinct, half-scores).

The shapes are chosen to reach every branch of csrc/cpu/pk_topk.cpp and topk_select.h:
- the packed float path (float32/bf16/fp16 inputs, n_keys <= 65536) and the generic path
  (float64 inputs, or n_keys > 65536);
- in the packed path, the guessed filter bar (mean + z * sd, tried when 1.3 k / n_keys <
  0.25) when it holds between k and 4k entries, and the group-maxima bar when the guess
  keeps too few (outliers) or too many (a tied top) entries; no bar at all (every entry
  passes) for rows shorter than 8k, with or without a failed guess before it; in the
  generic path, the group-maxima bar directly;
- the pair pruning (rank product <= k, then the pair bar from the first row and column),
  with ties on the bar;
- n_keys at its limits: 1, 65536 (the largest packed index is 2^32 - 1) and 65537.
"""
from __future__ import annotations

import math

import pytest
import torch

from memory_ext import ops
from memory_ext.reference import half_scores, pk_topk_bruteforce

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # the packed path

# Pair scores the full brute force may materialise in one test (float64 elements).
BRUTE_FORCE_BUDGET = 1 << 22


def dyadic(shape, lo, hi, exp, gen):
    """Integers in [lo, hi] times 2^-exp, float64 (exact in bf16 for |ints| <= 256)."""
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).double() * 2.0**-exp


def stable_bruteforce(query, keys, k):
    """Top k of all n_keys^2 pair sums in float64: score descending, then index ascending."""
    s1, s2 = half_scores(query, keys)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    # A stable sort keeps equal scores in ascending index order.
    scores, indices = torch.sort(full, dim=-1, descending=True, stable=True)
    return scores[..., :k], indices[..., :k]


def stable_grid_reference(query, keys, k):
    """The same answer from the k x k grid of each half's stable top k, for n_keys too
    large for the brute force. Exact with exact half-scores: a pair whose half ranks
    beyond k in its half is beaten by the k pairs that replace that half with one ranked
    above it (sum at least as large; when equal, the half-scores tie and the replacing
    half has the lower index, hence the lower pair index)."""
    n_keys = keys.shape[2]
    s1, s2 = half_scores(query, keys)
    v1, i1 = torch.sort(s1, dim=-1, descending=True, stable=True)
    v2, i2 = torch.sort(s2, dim=-1, descending=True, stable=True)
    v1, i1, v2, i2 = v1[..., :k], i1[..., :k], v2[..., :k], i2[..., :k]
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)
    cand_idx = (i1.unsqueeze(-1) * n_keys + i2.unsqueeze(-2)).flatten(-2)
    # Lexicographic (score desc, index asc): sort by index, then stably by score.
    cand_idx, order = cand_idx.sort(dim=-1)
    cand = cand.gather(-1, order)
    scores, pos = torch.sort(cand, dim=-1, descending=True, stable=True)
    return scores[..., :k], cand_idx.gather(-1, pos)[..., :k]


def reference(query, keys, k):
    tokens, heads, n_keys = query.shape[0], query.shape[1], keys.shape[2]
    if tokens * heads * n_keys * n_keys <= BRUTE_FORCE_BUDGET:
        return stable_bruteforce(query, keys, k)
    return stable_grid_reference(query, keys, k)


def assert_exact(query, keys, ks):
    """pk_topk on the CPU, and pk_topk_by_sorting (the CUDA op's path for large k), equal
    the reference bit for bit (scores and indices), for each k of ks (an int or a list);
    returns pk_topk's outputs for the last k."""
    ks = [ks] if isinstance(ks, int) else list(ks)
    # The first k of a stable order are the top k for every smaller k: one reference.
    all_scores, all_indices = reference(query, keys, max(ks))
    score_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    for k, op in ((k, op) for op in (ops.pk_topk_by_sorting, ops.pk_topk) for k in ks):
        scores, indices = op(query, keys, k)
        want_scores, want_indices = all_scores[..., :k], all_indices[..., :k]
        assert scores.dtype == score_dtype and indices.dtype == torch.int64
        assert scores.shape == indices.shape == want_scores.shape
        bad = (scores.double() != want_scores) | (indices != want_indices)
        if bad.any():
            t, h, j = (int(x) for x in bad.nonzero()[0])
            raise AssertionError(
                f"{op.__name__}, k = {k}: {int(bad.sum())} of {bad.numel()} entries differ; first at token {t}, head {h}, "
                f"rank {j}: got ({scores[t, h, j].item()}, {indices[t, h, j].item()}), "
                f"want ({want_scores[t, h, j].item()}, {want_indices[t, h, j].item()})"
            )
    return scores, indices


def cast(query, keys, dtype):
    q, kk = query.to(dtype), keys.to(dtype)
    # The inputs must be exact in dtype, or the test would compare roundings.
    assert torch.equal(q.double(), query) and torch.equal(kk.double(), keys), "inputs not exact in dtype"
    return q, kk


# ---------------------------------------------------------------------------------------
# Which filter each half-row of the packed path takes (mirrors select_top_packed and
# top_bar in csrc/cpu/topk_select.h; a test asserts its inputs reach the branch it is
# about, so a retuned constant there shows up here instead of silently skipping a case).


def guess_z(n_keys, k):
    tail = 1.3 * k / n_keys
    if tail >= 0.25:
        return None
    lo, hi = 0.0, 8.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(mid / math.sqrt(2.0)) > tail:
            lo = mid
        else:
            hi = mid
    return lo


def filter_kinds(query, keys, k):
    """Per half-row: "guess" (the guessed bar kept k..4k entries), "too_few", "too_many"
    (it kept fewer / more), "no_guess" (not tried). Rows near a boundary count as
    "unclear" (the kernel's float32 moments could fall either way)."""
    s1, s2 = half_scores(query, keys)
    rows = torch.cat([s1.flatten(0, 1), s2.flatten(0, 1)])
    n_keys = rows.shape[-1]
    z = guess_z(n_keys, k)
    if z is None:
        return ["no_guess"] * rows.shape[0]
    mean = rows.mean(-1, keepdim=True)
    sd = (rows.square().mean(-1, keepdim=True) - mean.square()).clamp(min=0).sqrt()
    kinds = []
    for row, bar in zip(rows, (mean + z * sd).squeeze(-1), strict=True):
        lo_kept = int((row >= bar + 1e-3 * (1 + bar.abs())).sum())
        hi_kept = int((row >= bar - 1e-3 * (1 + bar.abs())).sum())
        if hi_kept < k:
            kinds.append("too_few")
        elif lo_kept > 4 * k:
            kinds.append("too_many")
        elif k <= lo_kept and hi_kept <= 4 * k:
            kinds.append("guess")
        else:
            kinds.append("unclear")
    return kinds


def group_bar_is_active(n_keys, k):
    """top_bar returns -inf (no filter) for rows shorter than 8k."""
    return n_keys >= 8 * k


# ---------------------------------------------------------------------------------------
# A grid over shapes and every dtype.

# (tokens, heads, n_keys, half, k, int range, exponent)
GRID = [
    (3, 1, 1, 2, 1, 4, 2),  # n_keys = 1
    (5, 2, 2, 1, 2, 2, 0),  # k = n_keys = 2
    (7, 3, 37, 3, 37, 4, 2),  # k = n_keys: no bar, every pair of the grid
    (6, 2, 100, 4, 7, 4, 2),  # guessed bar, group bar behind it
    (8, 2, 300, 2, 32, 2, 1),  # half = 2, ints in [-2, 2]: most half-scores tie
    (4, 2, 1024, 8, 1, 8, 3),  # k = 1
    (3, 1, 400, 6, 64, 3, 1),  # 5.2k < n_keys < 8k: guess tried, no group bar behind it
    (2, 1, 2048, 16, 256, 16, 4),  # k = 256, wide halves
    (300, 2, 2048, 4, 8, 1, 0),  # two token blocks (block = 256 here), ints in [-1, 1]
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("tokens,heads,n_keys,half,k,r,e", GRID)
def test_grid_exact(dtype, tokens, heads, n_keys, half, k, r, e):
    g = torch.Generator().manual_seed(tokens * 1000 + n_keys + k)
    query = dyadic((tokens, heads, 2 * half), -r, r, e, g)
    keys = dyadic((heads, 2, n_keys, half), -r, r, e, g)
    assert_exact(*cast(query, keys, dtype), k)


def test_grid_reference_is_the_brute_force():
    """The k x k grid reference (used beyond the brute-force budget) is the brute force."""
    g = torch.Generator().manual_seed(7)
    for n_keys, half, r, k in [(64, 2, 1, 16), (200, 3, 2, 30), (50, 1, 3, 50), (129, 4, 4, 5)]:
        query = dyadic((9, 2, 2 * half), -r, r, 0, g)
        keys = dyadic((2, 2, n_keys, half), -r, r, 0, g)
        want = stable_bruteforce(query, keys, k)
        got = stable_grid_reference(query, keys, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        # And both agree in score with the project's reference.
        assert torch.equal(want[0], pk_topk_bruteforce(query, keys, k)[0])


# ---------------------------------------------------------------------------------------
# Heavy ties: every pair ties with many others.


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n_keys,k", [(6, 5), (64, 16), (64, 64), (512, 16), (512, 100)])
def test_all_half_scores_from_few_values(dtype, n_keys, k):
    """half = 1, query 1 and keys in {0, .., 3}: four half-score values, sums in {0, .., 6}.
    The top k is decided by the tie rule almost entirely."""
    g = torch.Generator().manual_seed(n_keys + k)
    query = torch.ones(4, 2, 2, dtype=torch.float64)
    query[1] = 2.0
    query[2, :, 1] = -1.0  # second half reversed: the best keys of half 2 are its zeros
    query[3, 1] = torch.tensor([0.5, 0.0], dtype=torch.float64)  # all of half 2 ties at 0
    keys = dyadic((2, 2, n_keys, 1), 0, 3, 0, g)
    assert_exact(*cast(query, keys, dtype), k)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_pair_ties(dtype):
    """All n_keys^2 sums equal: the answer is indices 0 .. k-1."""
    query = torch.full((3, 2, 8), 0.5, dtype=torch.float64)
    keys = torch.full((2, 2, 700, 4), -0.25, dtype=torch.float64)
    scores, indices = assert_exact(*cast(query, keys, dtype), 40)
    assert torch.equal(indices[0, 0], torch.arange(40))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_duplicate_sub_keys(dtype):
    """Each sub-key appears several times at scattered positions: every half-score is
    shared by several indices, so the lower index must win at every rank."""
    g = torch.Generator().manual_seed(11)
    base = dyadic((2, 2, 50, 8), -8, 8, 3, g)
    pick = torch.randint(0, 50, (600,), generator=g)
    keys = base[:, :, pick]  # (2, 2, 600, 8): about 12 copies of each sub-key
    query = dyadic((10, 2, 16), -8, 8, 3, g)
    assert_exact(*cast(query, keys, dtype), [1, 12, 13, 50, 97])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_signed_zero_scores_tie(dtype):
    """Zero queries and zero sub-keys make half-scores of either sign of zero; -0 and +0
    tie, and the tie goes to the lower index."""
    g = torch.Generator().manual_seed(5)
    keys = dyadic((1, 2, 200, 4), -2, 2, 1, g)
    keys[0, :, 100:150] = 0.0
    keys[0, :, 150:160] = -keys[0, :, 150:160].abs() - 0.5  # all-negative sub-keys
    query = torch.zeros(4, 1, 8, dtype=torch.float64)
    query[1, 0, :4] = 1.0  # first half scores, second half all zero
    query[2, 0, 4:] = -0.5
    assert_exact(*cast(query, keys, dtype), [1, 30, 200])


# ---------------------------------------------------------------------------------------
# Each filter of the packed path, and the generic path on the same inputs.


def outlier_inputs(gen, tokens, n_keys, half, n_out):
    """Sub-keys in [-1, 1] but n_out per half scaled by 64: the outliers inflate the row's
    spread so much that the guessed bar keeps only (some of) them, fewer than k."""
    query = dyadic((tokens, 1, 2 * half), 1, 2, 0, gen)  # positive: outliers score high
    keys = dyadic((1, 2, n_keys, half), -1, 1, 0, gen)
    out = torch.randperm(n_keys, generator=gen)[:n_out]
    keys[:, :, out] = keys[:, :, out].abs() * 64
    return query, keys


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_guessed_bar_keeps_too_few(dtype):
    g = torch.Generator().manual_seed(21)
    query, keys = outlier_inputs(g, 6, 2048, 4, n_out=10)
    k = 32
    kinds = filter_kinds(query, keys, k)
    assert kinds.count("too_few") == len(kinds), kinds
    assert group_bar_is_active(2048, k)
    assert_exact(*cast(query, keys, dtype), k)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_guessed_bar_keeps_too_many(dtype):
    """A tied top: 8% of the sub-keys are one vector that scores highest, the rest score
    close together, so the guessed bar (mean + 2.3 sd) falls below the tied top and keeps
    far more than 4k entries; the group bar then equals the tied top score, so only
    entries equal to it may pass, and the lowest indices win."""
    g = torch.Generator().manual_seed(22)
    query = dyadic((5, 1, 8), 1, 3, 1, g)
    keys = dyadic((1, 2, 2048, 4), -1, 1, 2, g)
    top = torch.randperm(2048, generator=g)[:164]
    keys[:, :, top] = 1.5
    k = 16
    kinds = filter_kinds(query, keys, k)
    assert kinds.count("too_many") == len(kinds), kinds
    assert_exact(*cast(query, keys, dtype), k)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_guessed_bar_holds(dtype):
    """Bell-shaped rows (sums of 16 dyadic products): the guess keeps k..4k entries."""
    g = torch.Generator().manual_seed(23)
    query = dyadic((12, 2, 32), -4, 4, 2, g)
    keys = dyadic((2, 2, 4096, 16), -4, 4, 2, g)
    k = 32
    kinds = filter_kinds(query, keys, k)
    assert kinds.count("guess") >= len(kinds) * 3 // 4, kinds
    assert_exact(*cast(query, keys, dtype), k)


def tiered_keys(gen, n_keys, counts):
    """(1, 2, n_keys, 1) sub-keys: counts[v] entries of value v per half, shuffled."""
    tiers = torch.cat([torch.full((c,), float(v), dtype=torch.float64) for v, c in counts.items()])
    assert tiers.numel() == n_keys
    keys = torch.empty(1, 2, n_keys, 1, dtype=torch.float64)
    for h in range(2):
        keys[0, h, :, 0] = tiers[torch.randperm(n_keys, generator=gen)]
    return keys


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_group_bar_with_ties_at_the_bar(dtype):
    """Three half-score values: k / 2 twos, many ones, zeros. The guessed bar lands between
    1 and 2 and keeps too few; the k-th group maximum (the bar the packed path falls back
    to, and the generic path's only bar) is then 1, shared by the ones: the filter must
    keep entries equal to the bar, and the lowest indices among them win."""
    g = torch.Generator().manual_seed(24)
    query = torch.tensor([[[1.0, 1.0]], [[2.0, 1.0]], [[0.5, 2.0]]], dtype=torch.float64)
    for n_keys, k, ones in [(1024, 128, 640), (2000, 40, 1000), (512, 8, 256)]:
        keys = tiered_keys(g, n_keys, {2: k // 2, 1: ones, 0: n_keys - k // 2 - ones})
        kinds = filter_kinds(query, keys, k)
        assert kinds.count("too_few") == len(kinds), kinds
        assert group_bar_is_active(n_keys, k)
        assert_exact(*cast(query, keys, dtype), k)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_failed_guess_on_a_short_row(dtype):
    """5.2k < n_keys < 8k: the guess is tried and keeps too few, and top_bar has no bar
    for so short a row: every entry must then pass."""
    g = torch.Generator().manual_seed(26)
    n_keys, k = 400, 64
    query = torch.tensor([[[1.0, 1.0]], [[0.5, 2.0]]], dtype=torch.float64)
    keys = tiered_keys(g, n_keys, {2: 32, 1: 200, 0: 168})
    kinds = filter_kinds(query, keys, k)
    assert kinds.count("too_few") == len(kinds), kinds
    assert not group_bar_is_active(n_keys, k)
    assert_exact(*cast(query, keys, dtype), [1, 40, 64])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_pair_pruning_ties(dtype):
    """Half-scores with long tied runs, so the pair bar (the k-th best of the first row and
    column of the sorted grid) is shared by many pairs inside the rank-product triangle,
    and the k-th pair ties with pairs beyond it: the kept set must include every pair
    equal to the bar and order the ties by index."""
    g = torch.Generator().manual_seed(25)
    n_keys = 64
    # Half 1 runs: 3 x 5, 2 x 9, 1 x 20, 0 x 30; half 2 likewise shuffled differently.
    runs = torch.tensor([3.0] * 5 + [2.0] * 9 + [1.0] * 20 + [0.0] * 30, dtype=torch.float64)
    keys = torch.zeros(1, 2, n_keys, 1, dtype=torch.float64)
    keys[0, 0, :, 0] = runs[torch.randperm(n_keys, generator=g)]
    keys[0, 1, :, 0] = runs[torch.randperm(n_keys, generator=g)]
    query = torch.tensor([[[1.0, 1.0]], [[2.0, 1.0]], [[1.0, 2.0]], [[0.5, 0.25]]], dtype=torch.float64)
    assert_exact(*cast(query, keys, dtype), [1, 5, 6, 9, 14, 25, 45, 64])


# ---------------------------------------------------------------------------------------
# n_keys at its limits: 65536 is the largest packed n_keys (index 2^32 - 1 fits in the
# packed key's 32 bits), 65537 takes the generic path with indices beyond 2^32.


def far_end_inputs(n_keys, gen):
    """Best sub-keys placed at the far end (the largest indices), tied in groups."""
    query = dyadic((20, 1, 4), 1, 2, 0, gen)
    keys = dyadic((1, 2, n_keys, 2), -4, 2, 1, gen)
    keys[:, :, -7:] = 4.0  # seven tied best sub-keys per half, the last one at n_keys - 1
    keys[:, 0, -300:-200] = 3.5  # a tied second tier
    return query, keys


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n_keys", [65536, 65537])
def test_n_keys_limits(dtype, n_keys):
    g = torch.Generator().manual_seed(n_keys)
    query, keys = far_end_inputs(n_keys, g)
    scores, indices = assert_exact(*cast(query, keys, dtype), [1, 49, 64])
    top = (n_keys - 7) * n_keys + (n_keys - 7)
    assert indices[0, 0, 0].item() == top  # the lowest index among the 49 tied best pairs
    assert indices[0, 0, 48].item() == n_keys * n_keys - 1
    if n_keys == 65536:
        assert indices.max().item() == 2**32 - 1
    else:
        assert indices.max().item() > 2**32
