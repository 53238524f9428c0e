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

import memory_ext
from memory_ext.reference import pair_scores, pk_topk_bruteforce
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
        (320, 200, 16, torch.bfloat16),  # 32 k16-steps in registers
        (512, 96, 9, torch.float16),
        (300, 70, 70, torch.bfloat16),  # k == n_keys, partial tile, half % 8 != 0
        (520, 64, 3, torch.bfloat16),  # half > 512: plain path for bf16
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
# Layouts, determinism, sizes.


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_query_and_unaligned_keys(dtype):
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
