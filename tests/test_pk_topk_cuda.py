"""Tests of the CUDA kernel of torch.ops.memory.pk_topk (fused scoring + exact top-k).

GPU tests run when a GPU is visible and the CUDA kernels were built, and say which is
missing otherwise. tests/test_cuda_emulation.py runs the same kernel source on the CPU.

Two kinds of inputs:
- dyadic: integers in [-32, 32] / 32. Every product and partial sum is then exact in fp32
  (and in the tensor cores' accumulators), in any order, so results must equal a
  brute-force top-k over all n_keys^2 pairs bit for bit, ties (score desc, index asc)
  included, and equal the CPU kernel.
- gaussian: real rounding; compared without regard to near-ties (scores within a
  tolerance; every index whose score clearly beats the k-th must be returned; the score
  of every returned pair recomputed from the inputs).
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

import memory_ext
from memory_ext.reference import half_scores, pair_scores, pk_topk_bruteforce
from memory_ext.testing import accumulation_dtype, sample_inputs, tolerance

from conftest import CUDA_SKIP, requires_cuda


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


# ---------------------------------------------------------------------------------------
# Inputs and references.


def make_inputs(tokens, heads, n_keys, half, dtype, kind="dyadic", device="cuda", seed=0):
    """query: (tokens, heads, 2 * half); keys: (heads, 2, n_keys, half), drawn on device."""
    s = sample_inputs("pk_topk", device, dtype, seed=seed, tokens=tokens, heads=heads, n_keys=n_keys, half=half,
                      kind=kind)
    return s["query"], s["keys"]


def assert_exact(scores, indices, want_scores, want_indices):
    assert scores.shape == want_scores.shape and indices.shape == want_indices.shape
    torch.testing.assert_close(scores.double().cpu(), want_scores.double().cpu(), rtol=0, atol=0)
    assert torch.equal(indices.cpu(), want_indices.cpu())


def assert_tie_insensitive(query, keys, scores, indices, want_scores, want_indices, tol):
    """Scores within tol of the reference; every index whose reference score beats the
    k-th by more than tol is returned; the pairs returned are distinct and have the
    returned scores."""
    n2 = keys.shape[2] ** 2
    assert indices.min().item() >= 0 and indices.max().item() < n2
    torch.testing.assert_close(scores.double(), want_scores.double(), rtol=0, atol=tol)
    sorted_idx = indices.sort(dim=-1).values
    assert (sorted_idx[..., 1:] != sorted_idx[..., :-1]).all(), "a pair was returned twice"
    assert (scores[..., 1:] <= scores[..., :-1]).all(), "scores are not descending"
    recomputed = pair_scores(query.double(), keys.double(), indices)
    torch.testing.assert_close(scores.double(), recomputed, rtol=0, atol=tol)
    clear = want_scores > want_scores[..., -1:] + tol
    found = (want_indices[..., :, None] == indices[..., None, :]).any(-1)
    assert found[clear].all(), "an index that clearly belongs to the top k is missing"


# ---------------------------------------------------------------------------------------
# Correctness against brute force and the CPU kernel.

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRID = [
    (half, n_keys, k)
    for half in (32, 48, 128, 256)
    for n_keys in (64, 100, 1024)
    for k in (1, 7, 32, 256)
    if k <= n_keys
]


def _heads_for(half, n_keys, k):
    return 1 + (half + n_keys + k) % 8  # heads 1..8 spread over the grid


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("half,n_keys,k", GRID)
def test_exact_against_brute_force_and_cpu(half, n_keys, k, dtype):
    heads = _heads_for(half, n_keys, k)
    tokens = 5 if n_keys > 512 else 37
    q, keys = make_inputs(tokens, heads, n_keys, half, dtype, seed=half * 7 + n_keys + k)
    scores, indices = torch.ops.memory.pk_topk(q, keys, k)
    assert scores.dtype == accumulation_dtype(dtype) and indices.dtype == torch.int64
    assert scores.device == q.device
    want_s, want_i = pk_topk_bruteforce(q, keys, k)
    assert_exact(scores, indices, want_s, want_i)
    cpu_s, cpu_i = torch.ops.memory.pk_topk(q.cpu(), keys.cpu(), k)
    assert_exact(scores, indices, cpu_s, cpu_i)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("half,n_keys,k", [(32, 64, 7), (48, 100, 32), (128, 1024, 32), (256, 1024, 256)])
def test_gaussian_against_brute_force_and_cpu(half, n_keys, k, dtype):
    heads = _heads_for(half, n_keys, k)
    tokens = 6 if n_keys > 512 else 29
    q, keys = make_inputs(tokens, heads, n_keys, half, dtype, kind="gaussian", seed=k)
    scores, indices = torch.ops.memory.pk_topk(q, keys, k)
    want_s, want_i = pk_topk_bruteforce(q, keys, k)
    assert_tie_insensitive(q, keys, scores, indices, want_s, want_i, tol=2e-4)
    cpu_s, cpu_i = torch.ops.memory.pk_topk(q.cpu(), keys.cpu(), k)
    assert_tie_insensitive(q, keys, scores, indices, cpu_s.cuda().double(), cpu_i.cuda(), tol=2e-4)


@requires_cuda
@pytest.mark.parametrize(
    "half,n_keys,k,dtype",
    [
        (37, 130, 5, torch.bfloat16),  # odd half: element-wise sub-key loads
        (40, 64, 64, torch.float16),  # half not a multiple of 16, k == n_keys
        (256, 200, 16, torch.bfloat16),  # the widest half in registers (16 k16-steps)
        (320, 200, 16, torch.bfloat16),  # half > 256: query streamed from shared memory
        (512, 96, 9, torch.float16),
        (300, 70, 70, torch.bfloat16),  # k == n_keys, partial tile, half % 8 != 0
        (520, 64, 3, torch.bfloat16),  # streamed
        (1030, 100, 9, torch.float16),  # streamed, half % 8 != 0: element-wise sub-key loads
        (2048, 64, 16, torch.bfloat16),  # the widest streamed half
        (2048, 300, 256, torch.bfloat16),  # streamed where shared memory allows, else plain
        (2056, 64, 3, torch.bfloat16),  # half > 2048: plain path for bf16
        (33, 80, 12, torch.float32),
        (16, 128, 100, torch.float64),
    ],
)
def test_odd_shapes_exact(half, n_keys, k, dtype):
    q, keys = make_inputs(19, 2, n_keys, half, dtype, seed=half + k)
    scores, indices = torch.ops.memory.pk_topk(q, keys, k)
    want_s, want_i = pk_topk_bruteforce(q, keys, k)
    assert_exact(scores, indices, want_s, want_i)


@requires_cuda
def test_many_ties_exact():
    """Values in {-1, 0, 1}: scores tie constantly; the order must be score desc, index asc."""
    q, keys = make_inputs(40, 3, 100, 32, torch.bfloat16, kind="ties", seed=3)
    for k in (1, 7, 32, 100):
        scores, indices = torch.ops.memory.pk_topk(q, keys, k)
        assert_exact(scores, indices, *pk_topk_bruteforce(q, keys, k))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_8192_keys_against_cpu(dtype):
    q, keys = make_inputs(6, 2, 8192, 64, dtype, seed=11)
    for k in (1, 256):
        scores, indices = torch.ops.memory.pk_topk(q, keys, k)
        assert_exact(scores, indices, *torch.ops.memory.pk_topk(q.cpu(), keys.cpu(), k))


@requires_cuda
def test_float64_gaussian_against_cpu():
    q, keys = make_inputs(21, 3, 300, 24, torch.float64, kind="gaussian", seed=5)
    scores, indices = torch.ops.memory.pk_topk(q, keys, 20)
    cpu_s, cpu_i = torch.ops.memory.pk_topk(q.cpu(), keys.cpu(), 20)
    assert_tie_insensitive(q, keys, scores, indices, cpu_s.cuda(), cpu_i.cuda(), tol=1e-10)


# ---------------------------------------------------------------------------------------
# float32 on TF32 tensor cores (torch's float32 matmul precision below "highest").


@pytest.fixture
def tf32_allowed():
    """torch.set_float32_matmul_precision("high") for the test, the old value restored after."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(old)


def _tf32_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


requires_tf32 = pytest.mark.skipif(CUDA_SKIP is None and not _tf32_capable(),
                                   reason="TF32 tensor cores need compute capability 8.0 or newer")


def round_to_tf32(x: Tensor) -> Tensor:
    """float32 -> TF32 (10 mantissa bits), to nearest with ties away from zero, as a float32
    tensor: add half a unit to the magnitude bits, then clear the 13 low bits."""
    bits = x.float().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = ((bits + 0x1000) & ~0x1FFF).where(finite, bits)
    return rounded.view(torch.float32)


def _half_abs_sums(query, keys, indices):
    """sum |q1 * K1[i]| + sum |q2 * K2[j]| of each returned pair, float64."""
    return pair_scores(query.double().abs(), keys.double().abs(), indices)


def assert_tf32_result(query, keys, scores, indices):
    """The documented TF32 contract: every score within 2^-9 * (sum |q1 K1[i]| +
    sum |q2 K2[j]|) of the exact pair score, and the indices the exact top k of the TF32
    scores: each returned score within float32 accumulation error of its pair's score
    over TF32-rounded operands, and no pair left out whose TF32 score clearly beats the
    k-th returned one."""
    n_keys = keys.shape[2]
    assert scores.dtype == torch.float32
    assert (scores[..., 1:] <= scores[..., :-1]).all(), "scores are not descending"
    sorted_idx = indices.sort(dim=-1).values
    assert (sorted_idx[..., 1:] != sorted_idx[..., :-1]).all(), "a pair was returned twice"
    assert indices.min().item() >= 0 and indices.max().item() < n_keys**2
    abs_sums = _half_abs_sums(query, keys, indices)
    exact = pair_scores(query.double(), keys.double(), indices)
    assert ((scores.double() - exact).abs() <= 2.0**-9 * abs_sums).all(), "outside the TF32 bound"
    # Over TF32 operands only the float32 accumulation differs: at most half * 2^-23 of the
    # sums of absolute products (one float32 unit per addition, twice the rounding error).
    qt, kt = round_to_tf32(query), round_to_tf32(keys)
    rel = max(keys.shape[3], 16) * 2.0**-23
    acc = rel * _half_abs_sums(qt, kt, indices)
    tf32_scores = pair_scores(qt.double(), kt.double(), indices)
    assert ((scores.double() - tf32_scores).abs() <= acc).all(), "not the TF32 scores"
    s1, s2 = half_scores(qt.double(), kt.double())
    all_pairs = (s1[..., :, None] + s2[..., None, :]).flatten(2)
    a1, a2 = half_scores(qt.double().abs(), kt.double().abs())
    all_acc = rel * (a1[..., :, None] + a2[..., None, :]).flatten(2)
    clear = all_pairs - all_acc > scores[..., -1:].double() + acc[..., -1:]
    returned = torch.zeros_like(all_pairs, dtype=torch.bool).scatter_(-1, indices, True)
    assert returned[clear].all(), "a pair whose TF32 score beats the k-th is missing"


TF32_GRID = [(half, n_keys, k) for half in (32, 48, 128, 256) for n_keys in (64, 1024) for k in (1, 7, 256)
             if k <= n_keys]


@requires_cuda
@requires_tf32
@pytest.mark.parametrize("half,n_keys,k", TF32_GRID)
def test_tf32_exact_inputs_against_brute_force(half, n_keys, k, tf32_allowed):
    """Dyadic inputs are TF32 values and every sum is exact: bit for bit the brute force."""
    heads = _heads_for(half, n_keys, k)
    tokens = 5 if n_keys > 512 else 37
    q, keys = make_inputs(tokens, heads, n_keys, half, torch.float32, seed=half * 7 + n_keys + k)
    scores, indices = torch.ops.memory.pk_topk(q, keys, k)
    assert_exact(scores, indices, *pk_topk_bruteforce(q, keys, k))


@requires_cuda
@requires_tf32
@pytest.mark.parametrize("half,n_keys,k", [(32, 64, 7), (48, 100, 32), (128, 1024, 32), (200, 300, 16),
                                           (256, 1024, 256), (37, 130, 5), (300, 200, 16), (1024, 128, 8)])
def test_tf32_gaussian_within_documented_bound(half, n_keys, k, tf32_allowed):
    q, keys = make_inputs(6 if n_keys > 512 else 29, 2, n_keys, half, torch.float32, kind="gaussian", seed=k)
    scores, indices = torch.ops.memory.pk_topk(q, keys, k)
    assert_tf32_result(q, keys, scores, indices)


@requires_cuda
@requires_tf32
def test_float32_matmul_precision_picks_the_path():
    """"highest" (the default) keeps float32 exact to float32 rounding; "high" rounds the
    operands to TF32, which moves gaussian scores far more than float32 rounding does."""
    q, keys = make_inputs(40, 2, 256, 128, torch.float32, kind="gaussian", seed=13)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact_s, exact_i = torch.ops.memory.pk_topk(q, keys, 16)
        torch.set_float32_matmul_precision("high")
        tf32_s, tf32_i = torch.ops.memory.pk_topk(q, keys, 16)
    finally:
        torch.set_float32_matmul_precision(old)
    err_exact = (exact_s.double() - pair_scores(q.double(), keys.double(), exact_i)).abs().max().item()
    err_tf32 = (tf32_s.double() - pair_scores(q.double(), keys.double(), tf32_i)).abs().max().item()
    assert err_exact < 1e-4 < err_tf32
    assert_tf32_result(q, keys, tf32_s, tf32_i)


@requires_cuda
@requires_tf32
@pytest.mark.parametrize("half,n_keys,k", [(37, 130, 5), (300, 70, 9), (1024, 64, 16), (1030, 70, 9)])
def test_tf32_odd_shapes_exact(half, n_keys, k, tf32_allowed):
    """half 37 copies sub-keys element-wise; 300 and 1024 stream the query from shared
    memory; 1030 > 1024 takes the exact FMA path."""
    q, keys = make_inputs(19, 2, n_keys, half, torch.float32, seed=half + k)
    scores, indices = torch.ops.memory.pk_topk(q, keys, k)
    assert_exact(scores, indices, *pk_topk_bruteforce(q, keys, k))


@requires_cuda
@requires_tf32
def test_tf32_strided_query_and_unaligned_keys(tf32_allowed):
    _check_strided_query_and_unaligned_keys(torch.float32)


# ---------------------------------------------------------------------------------------
# Layouts, determinism, sizes.


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_query_and_unaligned_keys(dtype):
    _check_strided_query_and_unaligned_keys(dtype)


def _check_strided_query_and_unaligned_keys(dtype):
    q, keys = make_inputs(50, 4, 200, 64, dtype, kind="gaussian", seed=9)
    want = torch.ops.memory.pk_topk(q, keys, 16)
    # query as a view with padded rows and heads; keys at a 2-element storage offset
    # (not 16-byte aligned: the element-wise load path).
    q_big = torch.zeros(50, 4, 2 * 64 + 3, device="cuda", dtype=dtype)
    q_big[..., :128] = q
    flat = torch.zeros(keys.numel() + 2, device="cuda", dtype=dtype)
    flat[2:] = keys.flatten()
    keys_off = flat[2:].view(keys.shape)
    got = torch.ops.memory.pk_topk(q_big[..., :128], keys_off, 16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got_t = torch.ops.memory.pk_topk(q.transpose(0, 1).contiguous().transpose(0, 1), keys, 16)
    assert torch.equal(got_t[0], want[0]) and torch.equal(got_t[1], want[1])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype):
    q, keys = make_inputs(300, 4, 1024, 128, dtype, kind="gaussian", seed=2)
    a = torch.ops.memory.pk_topk(q, keys, 32)
    b = torch.ops.memory.pk_topk(q, keys, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_empty_tokens(dtype):
    q, keys = make_inputs(0, 3, 64, 32, dtype)
    scores, indices = torch.ops.memory.pk_topk(q, keys, 5)
    assert scores.shape == (0, 3, 5) and indices.shape == (0, 3, 5)
    assert scores.dtype == accumulation_dtype(dtype) and scores.is_cuda


@requires_cuda
def test_many_tokens_smoke():
    """10^6 tokens: the grid covers them all; sampled rows match brute force."""
    tokens = 1_000_000
    q, keys = make_inputs(tokens, 2, 64, 32, torch.bfloat16, seed=4)
    scores, indices = torch.ops.memory.pk_topk(q, keys, 4)
    assert scores.shape == (tokens, 2, 4)
    assert (scores[..., 1:] <= scores[..., :-1]).all()
    assert indices.min().item() >= 0 and indices.max().item() < 64 * 64
    rows = torch.cat([torch.arange(64), torch.randint(0, tokens, (200,)), torch.arange(tokens - 64, tokens)])
    rows = rows.to("cuda")
    want_s, want_i = pk_topk_bruteforce(q[rows], keys, 4)
    assert_exact(scores[rows], indices[rows], want_s, want_i)


@requires_cuda
def test_tuning_override_gives_same_result(monkeypatch):
    q, keys = make_inputs(200, 2, 300, 64, torch.bfloat16, kind="gaussian", seed=8)
    results = []
    for warps in ("1", "2", "4", "8"):
        monkeypatch.setenv("MEMORY_EXT_PK_TOPK_WARPS", warps)
        results.append(torch.ops.memory.pk_topk(q, keys, 32))
    for s, i in results[1:]:
        assert torch.equal(s, results[0][0]) and torch.equal(i, results[0][1])


# ---------------------------------------------------------------------------------------
# Autograd, opcheck, errors.

_needs_bag = pytest.mark.skipif(
    CUDA_SKIP is None and not _has_cuda_kernel("memory::embedding_bag"),
    reason="the backward of pk_topk uses the embedding_bag CUDA kernels, not built yet",
)


@requires_cuda
@_needs_bag
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_against_reference(dtype):
    q, keys = make_inputs(33, 3, 100, 48, dtype, kind="gaussian", seed=6)
    q.requires_grad_(True)
    keys.requires_grad_(True)
    scores, indices = memory_ext.pk_topk(q, keys, 9)
    grad = torch.randn_like(scores)
    gq, gk = torch.autograd.grad(scores, (q, keys), grad)
    # The reference in float64 (a 16-bit autograd would round every contribution); the
    # kernels sum in float32 and round once: k sub-keys per query gradient, at most
    # tokens * k queries per sub-key gradient.
    q2, k2 = q.detach().double().requires_grad_(True), keys.detach().double().requires_grad_(True)
    ref = pair_scores(q2, k2, indices)
    rq, rk = torch.autograd.grad(ref, (q2, k2), grad.double())
    torch.testing.assert_close(gq.double(), rq, **tolerance(dtype, terms=9))
    torch.testing.assert_close(gk.double(), rk, **tolerance(dtype, terms=33 * 9))
    # deterministic: the same gradients bitwise on a second run
    gq2, gk2 = torch.autograd.grad(memory_ext.pk_topk(q, keys, 9)[0], (q, keys), grad)
    assert torch.equal(gq, gq2) and torch.equal(gk, gk2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    q, keys = make_inputs(9, 2, 64, 32, dtype, kind="gaussian", seed=1)
    utils = ["test_schema", "test_faketensor"]
    if _has_cuda_kernel("memory::embedding_bag"):
        q.requires_grad_(True)
        keys.requires_grad_(True)
        utils += ["test_autograd_registration", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(torch.ops.memory.pk_topk.default, (q, keys, 5), test_utils=utils)


@requires_cuda
def test_compile_fullgraph():
    q, keys = make_inputs(21, 2, 100, 32, torch.bfloat16, kind="gaussian", seed=12)

    def f(q, keys):
        scores, indices = memory_ext.pk_topk(q, keys, 8)
        return scores.softmax(-1), indices

    got = torch.compile(f, fullgraph=True)(q, keys)
    want = f(q, keys)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


@requires_cuda
def test_errors():
    q, keys = make_inputs(4, 2, 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        torch.ops.memory.pk_topk(q, keys.cpu(), 4)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, n_keys = 64\]"):
        torch.ops.memory.pk_topk(q, keys, 65)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.memory.pk_topk(q, keys.half(), 4)


@requires_cuda
@pytest.mark.parametrize(
    "tokens,heads,n_keys,half,k",
    [
        (5, 2, 2048, 8, 2048),  # k beyond the fused kernels' shared memory
        (3, 1, 1024, 16, 700),
        (4, 1, 65537, 2, 3),  # n_keys beyond the kernels' 32-bit combined indices
    ],
)
def test_beyond_the_fused_kernel_equals_the_cpu(tokens, heads, n_keys, half, k):
    """What the fused kernels cannot take goes to pk_topk_by_sorting: the op's contract on
    CUDA for any k <= n_keys, bit for bit the CPU's on exact inputs."""
    q, keys = make_inputs(tokens, heads, n_keys, half, torch.float32)
    got = torch.ops.memory.pk_topk(q, keys, k)
    want = torch.ops.memory.pk_topk(q.cpu(), keys.cpu(), k)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])
    by_sorting = torch.ops.memory.pk_topk_by_sorting(q, keys, k)
    assert torch.equal(by_sorting[1], got[1]) and torch.equal(by_sorting[0], got[0])
