"""pk_topk against a brute-force top-k over all n_keys^2 pairs (memory_ext.reference).

Gaussian inputs: scores within the float32 (float64) tolerance of a sum of 2 * half
products, every returned index scoring what it claims. Dyadic inputs and inputs in
{-1, 0, 1} (constant ties): every score is exact, so scores and indices must equal the
brute force exactly, ties in ascending index order.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memory_ext
from memory_ext import ops
from memory_ext.reference import half_scores, pk_topk_bruteforce
from memory_ext.testing import accumulation_dtype, sample_inputs, tolerance


def make_inputs(tokens, heads, n_keys, half, dtype, device, seed=0, kind="gaussian"):
    s = sample_inputs("pk_topk", device, dtype, seed=seed, tokens=tokens, heads=heads, n_keys=n_keys, half=half,
                      kind=kind)
    return s["query"], s["keys"]


def score_tolerance(query, keys):
    """A score is two float32 (float64) dot products of half terms each."""
    def rms(t):
        t = t.double()[t.isfinite()]
        return t.square().mean().sqrt().item() if t.numel() else 1.0

    scale = rms(query) * rms(keys)
    return tolerance(accumulation_dtype(query.dtype), terms=2 * keys.shape[-1], scale=scale)


def check_topk(query, keys, k, scores, indices, exact=False):
    """Scores equal the brute-force top-k (NaN first, at the same places); every index
    scores what it claims; no repeats. exact: indices equal too, and scores bit for bit."""
    n_keys = keys.shape[2]
    ref_scores, ref_indices = pk_topk_bruteforce(query, keys, k)
    nan = ref_scores.isnan()
    assert torch.equal(scores.isnan(), nan), "NaN scores must come first, as many as the brute force has"
    tol = dict(rtol=0.0, atol=0.0) if exact else score_tolerance(query, keys)
    torch.testing.assert_close(scores.double()[~nan], ref_scores[~nan], **tol)
    s1, s2 = half_scores(query, keys)
    i, j = indices // n_keys, indices % n_keys
    claimed = s1.gather(-1, i) + s2.gather(-1, j)
    torch.testing.assert_close(claimed, scores.double(), **tol, equal_nan=True)
    finite = scores[..., 1:].isnan() | (scores[..., :-1] >= scores[..., 1:])
    assert finite.all(), "scores must be sorted descending"
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all(), "an index repeats"
    assert ((indices >= 0) & (indices < n_keys * n_keys)).all()
    if exact:
        assert torch.equal(indices, ref_indices), "ties must be broken by lower index"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "tokens,heads,n_keys,half,k",
    [(1, 1, 1, 1, 1), (7, 1, 5, 3, 5), (33, 4, 100, 16, 32), (20, 2, 64, 48, 7), (9, 3, 37, 8, 1), (5, 2, 300, 8, 256),
     (16, 2, 1024, 8, 32), (40, 4, 256, 16, 8), (24, 2, 128, 16, 16),
     # n_keys and half multiples of 32 and 64 tokens or more: bf16 takes our AMX or
     # AVX512-BF16 scoring where the CPU has one, in blocks of 32 or 12 tokens (70 and 97
     # leave a short last block for both); float32 (and float16, and bf16 without a bf16
     # kernel) our AVX-512 scoring, which takes any half: tiles of 96 tokens at n_keys <= 512
     # (200 leaves 8), of 60 at 1024 (70 leaves 10)
     (70, 2, 64, 32, 8), (97, 3, 96, 64, 16), (600, 2, 64, 32, 8), (200, 2, 32, 5, 9), (70, 1, 1024, 7, 32)],
)
def test_matches_bruteforce(device, dtype, tokens, heads, n_keys, half, k):
    query, keys = make_inputs(tokens, heads, n_keys, half, dtype, device)
    scores, indices = ops.pk_topk(query, keys, k)
    assert scores.dtype == accumulation_dtype(dtype) and indices.dtype == torch.int64
    assert scores.shape == indices.shape == (tokens, heads, k)
    check_topk(query, keys, k, scores, indices)


def test_empty_tokens(device):
    query, keys = make_inputs(0, 4, 16, 8, torch.float32, device)
    scores, indices = ops.pk_topk(query, keys, 4)
    assert scores.shape == indices.shape == (0, 4, 4)


@pytest.mark.parametrize("shape", ["heavy_tail", "outliers", "bimodal"])
def test_skewed_score_distributions(device, shape):
    # The CPU search guesses its filter bar from each row's mean and spread; rows far from
    # normal must fall back to the exact bar and still give the exact top-k.
    query, keys = make_inputs(64, 2, 256, 8, torch.float32, device, seed=3)
    if shape == "heavy_tail":
        keys = keys**3
    elif shape == "outliers":
        keys[:, :, ::37] *= 50
    else:
        keys[:, :, 128:] += 4 * query[0, :, :8].reshape(2, 1, 1, 8).sign()
    scores, indices = ops.pk_topk(query, keys, 16)
    check_topk(query, keys, 16, scores, indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_ranks_first_like_torch_topk(device, dtype):
    query, keys = make_inputs(3, 2, 64, 8, dtype, device)
    keys[1, 0, 5, 2] = float("nan")  # every pair (5, j) of head 1 scores NaN
    scores, indices = ops.pk_topk(query, keys, 6)
    assert torch.isnan(scores[:, 1]).all()
    assert (indices[:, 1] // 64 == 5).all(), "the NaN pairs come first"
    assert (indices[:, 1].diff(dim=-1) > 0).all(), "NaN ties are broken by lower index"
    check_topk(query, keys, 6, scores, indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["dyadic", "ties"])
@pytest.mark.parametrize("tokens,heads,n_keys,half,k", [(7, 1, 5, 3, 5), (33, 4, 100, 16, 32), (9, 3, 37, 8, 1),
                                                        (5, 2, 300, 8, 256), (20, 2, 64, 48, 7), (70, 2, 64, 32, 8),
                                                        (69, 2, 32, 96, 16)])
def test_exact_inputs_match_bruteforce_exactly(device, dtype, kind, tokens, heads, n_keys, half, k):
    query, keys = make_inputs(tokens, heads, n_keys, half, dtype, device, kind=kind, seed=k)
    scores, indices = ops.pk_topk(query, keys, k)
    check_topk(query, keys, k, scores, indices, exact=True)


def test_ties_are_broken_by_lower_index():
    query = torch.ones(2, 1, 4)
    keys = torch.ones(1, 2, 6, 2)  # every pair scores 4
    scores, indices = ops.pk_topk(query, keys, 5)
    assert torch.equal(scores, torch.full((2, 1, 5), 4.0))
    assert torch.equal(indices[0, 0], torch.tensor([0, 1, 2, 3, 4]))


def test_non_contiguous_query(device):
    query, keys = make_inputs(12, 2, 40, 8, torch.float32, device)
    wide = torch.randn(12, 2, 40, device=device)
    wide[..., :16] = query
    q = wide[..., :16]
    assert not q.is_contiguous()
    scores, indices = ops.pk_topk(q, keys, 6)
    check_topk(query, keys, 6, scores, indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(device, dtype):
    query, keys = make_inputs(17, 3, 50, 12, dtype, device)
    query.requires_grad_(True)
    keys.requires_grad_(True)
    scores, indices = memory_ext.pk_topk(query, keys, 9)
    grad = torch.randn_like(scores)
    scores.backward(grad)
    q = query.detach().double().requires_grad_(True)
    kk = keys.detach().double().requires_grad_(True)
    s1, s2 = half_scores(q, kk)
    n_keys = keys.shape[2]
    ref = s1.gather(-1, indices // n_keys) + s2.gather(-1, indices % n_keys)
    ref.backward(grad.double())
    # grad_query sums k sub-key rows, a sub-key's gradient at most tokens * k query halves;
    # each rounded once to the input dtype.
    scale = grad.double().square().mean().sqrt().item()
    torch.testing.assert_close(query.grad.double(), q.grad, **tolerance(dtype, terms=9, scale=scale))
    torch.testing.assert_close(keys.grad.double(), kk.grad, **tolerance(dtype, terms=17 * 9, scale=scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_are_deterministic_across_threads(dtype):
    """bf16 scores come from our AMX or AVX512-BF16 kernel where the CPU has one, float32 scores from
    our AVX-512 kernel where the CPU has AVX-512, else from torch's GEMM."""
    query, keys = make_inputs(600, 4, 256, 32, dtype, "cpu")
    query.requires_grad_(True)
    keys.requires_grad_(True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            scores, indices = memory_ext.pk_topk(query, keys, 16)
            gq, gk = torch.autograd.grad(scores.sum(), (query, keys))
            results.append((scores, indices, gq, gk))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    if not os.path.exists("/proc/cpuinfo"):
        return set()
    with open("/proc/cpuinfo") as f:
        return set(f.read().split())


def kernel_in_fresh_process(env: dict, which: str = "bf16") -> str:
    """The bf16 (or f32) scoring kernel a new process with this environment picks."""
    code = f"import memory_ext; print(memory_ext._C.cpu_{which}_scoring_kernel())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def pytest_in_fresh_process(env: dict, selection: str) -> None:
    """Runs this file's tests that match selection (pytest -k) in a new process with env, which
    reads the kernel settings once; they must all pass."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


BRUTEFORCE_TESTS = "(test_matches_bruteforce or test_exact_inputs_match_bruteforce_exactly) and cpu"


def test_bf16_inputs_without_the_bf16_kernel():
    """MEMORY_EXT_CPU_BF16_DOT=0 turns off our bf16 scoring (bf16_scores.h): the bf16
    cases then take torch's float32 GEMM, as on CPUs without it, and must pass the same
    checks. Run in a fresh process, which reads the setting once."""
    env = dict(os.environ, MEMORY_EXT_CPU_BF16_DOT="0")
    assert kernel_in_fresh_process(env) == "none"
    pytest_in_fresh_process(env, f"{BRUTEFORCE_TESTS} and bfloat16")


@pytest.mark.parametrize("bf16_kernel", ["0", "1"])
def test_inputs_on_torchs_gemm_without_our_f32_kernel(bf16_kernel):
    """MEMORY_EXT_CPU_F32_DOT=0: every call our bf16 kernels do not take (with
    MEMORY_EXT_CPU_BF16_DOT=0 every call; with it on, those with a subnormal bf16 input) is
    scored by torch's GEMM and selected per block of tokens, as on CPUs without AVX-512: the
    same checks, and the same bits at 1 and 2 threads."""
    env = dict(os.environ, MEMORY_EXT_CPU_F32_DOT="0", MEMORY_EXT_CPU_BF16_DOT=bf16_kernel)
    assert kernel_in_fresh_process(env, "f32") == "none"
    pytest_in_fresh_process(env, f"({BRUTEFORCE_TESTS} and not float64) or deterministic_across_threads"
                            " or test_subnormal_bf16_inputs_are_not_read_as_zero")


def test_our_f32_kernel_scores_float32_where_the_cpu_has_avx512():
    from memory_ext import _C

    if os.environ.get("MEMORY_EXT_CPU_F32_DOT", "1") != "1":
        pytest.skip("MEMORY_EXT_CPU_F32_DOT turns the kernel off (the test above checks that path)")
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    assert _C.cpu_f32_scoring_kernel() == ("avx512" if "avx512f" in flags else "none")


def test_bf16_inputs_on_the_avx512_bf16_kernel():
    """MEMORY_EXT_CPU_BF16_DOT=avx512_bf16 runs the bf16 cases on the VDPBF16PS kernel even
    where the CPU also has a tile unit (the kernel AMD Zen 4 takes by default): the same
    checks, and the same bits at 1 and 2 threads. Fresh process, as above."""
    flags = cpu_flags()
    if "avx512_bf16" not in flags:
        pytest.skip("no AVX512-BF16 on this CPU")
    env = dict(os.environ, MEMORY_EXT_CPU_BF16_DOT="avx512_bf16")
    assert kernel_in_fresh_process(env) == "avx512_bf16"
    pytest_in_fresh_process(env, f"({BRUTEFORCE_TESTS} and bfloat16) or test_forward_and_backward_are_deterministic_across_threads"
                            " or test_subnormal_bf16_inputs_are_not_read_as_zero")


@pytest.mark.parametrize("variable,value,dtype,expected", [
    ("MEMORY_EXT_CPU_BF16_DOT", "avx512", "bfloat16", "must be 0, 1, amx or avx512_bf16, got 'avx512'"),
    ("MEMORY_EXT_CPU_F32_DOT", "on", "float32", "must be 0 or 1, got 'on'"),
])
def test_a_misspelt_kernel_setting_is_an_error(variable, value, dtype, expected):
    env = dict(os.environ, **{variable: value})
    code = ("import torch, memory_ext\n"
            f"q, k = torch.randn(64, 1, 64).to(torch.{dtype}), torch.randn(1, 2, 32, 32).to(torch.{dtype})\n"
            "memory_ext.ops.pk_topk(q, k, 4)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"{variable} {expected}" in done.stderr


def test_our_bf16_kernel_scores_bf16_where_the_cpu_has_one():
    """On Linux with AMX-BF16 the bf16 cases above ran on the tile unit, with AVX512-BF16
    and no tile unit (AMD Zen 4) on our VDPBF16PS kernel (unless turned off)."""
    from memory_ext import _C

    flags = cpu_flags()
    if os.environ.get("MEMORY_EXT_CPU_BF16_DOT", "1") != "1":
        pytest.skip("MEMORY_EXT_CPU_BF16_DOT picks the kernel (the tests above check each setting)")
    if {"amx_bf16", "amx_tile"} <= flags:
        assert _C.cpu_bf16_scoring_kernel() in ("amx", "avx512_bf16")  # avx512_bf16: tile state refused
    elif "avx512_bf16" in flags:
        assert _C.cpu_bf16_scoring_kernel() == "avx512_bf16"
    else:
        pytest.skip("neither AMX-BF16 nor AVX512-BF16 on this CPU")


def test_subnormal_bf16_inputs_are_not_read_as_zero():
    """Our bf16 kernels read subnormal bf16 values as 0: a subnormal query value times a huge
    sub-key must still count, so such calls are scored in float32 (exact here), by our float32
    kernel or torch's GEMM."""
    query = torch.zeros(72, 2, 64, dtype=torch.bfloat16)
    keys = torch.zeros(2, 2, 64, 32, dtype=torch.bfloat16)
    query[3, 1, 0] = 2.0**-130  # subnormal in bf16
    keys[1, 0, 17, 0] = 2.0**120
    scores, indices = ops.pk_topk(query, keys, 4)
    assert scores[3, 1, 0].item() == 2.0**-10
    assert indices[3, 1, 0].item() == 17 * 64
    check_topk(query, keys, 4, scores, indices, exact=True)


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(0, 12),
    heads=st.integers(1, 4),
    n_keys=st.integers(1, 70),
    half=st.integers(1, 20),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    kind=st.sampled_from(["gaussian", "dyadic", "ties"]),
    nan_rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 69)), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property_matches_bruteforce(tokens, heads, n_keys, half, k_frac, dtype, kind, nan_rows, seed):
    """Shapes, dtypes, ties ({-1, 0, 1} inputs) and NaN sub-keys (each makes a whole row of
    pairs NaN): exact inputs must give the brute force exactly, and NaN pairs come first."""
    k = max(1, min(n_keys, round(k_frac * n_keys)))
    query, keys = make_inputs(tokens, heads, n_keys, half, dtype, "cpu", seed, kind=kind)
    for h, side, row in nan_rows:
        keys[h % heads, side, row % n_keys, 0] = float("nan")
    scores, indices = ops.pk_topk(query, keys, k)
    # Which NaN pairs are returned is not specified: compare indices only without NaN.
    check_topk(query, keys, k, scores, indices, exact=kind != "gaussian" and not nan_rows)
