"""torch.ops.memory.row_adagrad_: row-wise Adagrad on the rows of a sparse gradient.

Against the float64 reference (memory_ext.reference.row_adagrad_ref) over dtypes, row
widths and row sets (none, the table's first row, its last, many with both ends), on the
CPU and on CUDA; rows not listed unchanged bit for bit; the CPU result independent of the
thread count; the CUDA result repeatable and close to the CPU's; the data-dependent row
checks of the CPU kernel. Argument checks (eager and fake kernels) are in
tests/test_bad_input.py, opcheck in tests/test_op_registration.py, the CUDA device code
emulated on the CPU in tests/row_adagrad_emulate.cpp.
"""
import pytest
import torch

from memory_ext import ops
from memory_ext.reference import row_adagrad_ref
from memory_ext.testing import UNIT_ROUNDOFF, accumulation_dtype, generator, op_args, sample_inputs

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
N_ROWS = 300


def _rows(which: str, n_rows: int, device) -> torch.Tensor:
    if which == "none":
        return torch.empty(0, dtype=torch.long, device=device)
    if which == "first":
        return torch.tensor([0], device=device)
    if which == "last":
        return torch.tensor([n_rows - 1], device=device)
    # about half the table, both ends included
    picked = torch.randperm(n_rows, generator=generator(device, 7), device=device)[: n_rows // 2]
    ends = torch.tensor([0, n_rows - 1], device=device)
    return torch.unique(torch.cat([picked, ends]))


def _sample(device, dtype, dim, which, seed=0, **options):
    s = sample_inputs("row_adagrad_", device, dtype, seed=seed, n_rows=N_ROWS, dim=dim, **options)
    rows = _rows(which, N_ROWS, device)
    grad = torch.randn((len(rows), dim), generator=generator(device, seed + 1), device=device,
                       dtype=accumulation_dtype(dtype))
    s["rows"], s["rows_grad"] = rows, grad.to(dtype)
    return s


def _assert_close_to_reference(s, before, want):
    """sum_sq within the rounding of a sum of dim squares; param within one rounding to its
    dtype plus the accumulation error of the update, element by element."""
    param, sum_sq = s["param"], s["sum_sq"]
    dim = param.shape[1]
    u_out, u_acc = UNIT_ROUNDOFF[param.dtype], UNIT_ROUNDOFF[accumulation_dtype(param.dtype)]
    want_p, want_s = want
    err_s = (sum_sq.double() - want_s).abs()
    bound_s = (dim + 4) * u_acc * want_s.abs()
    assert bool((err_s <= bound_s).all()), f"sum_sq off by {err_s.max().item()}"
    # the update lr * g / (sqrt(s) + eps) carries about (dim / 2 + 5) roundings of the
    # accumulator (its mean square, the sqrt, the division); the rest a few
    update = (want_p - before.double()).abs()
    bound_p = 2 * u_out * want_p.abs() + u_acc * (4 * before.double().abs() + (dim + 16) * update)
    err_p = (param.double() - want_p).abs()
    bad = err_p > bound_p
    assert not bool(bad.any()), f"{int(bad.sum())} elements off, worst {err_p.max().item()}"


@pytest.mark.parametrize("which", ["none", "first", "last", "many"])
@pytest.mark.parametrize("dim", [1, 7, 64, 129])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, dtype, dim, which):
    s = _sample(device, dtype, dim, which)
    before_p, before_s = s["param"].clone(), s["sum_sq"].clone()
    want = row_adagrad_ref(*op_args(s))
    ops.row_adagrad_(**s)
    untouched = torch.ones(N_ROWS, dtype=torch.bool, device=device)
    untouched[s["rows"]] = False
    assert torch.equal(s["param"][untouched], before_p[untouched])
    assert torch.equal(s["sum_sq"][untouched], before_s[untouched])
    if which != "none":
        assert not torch.equal(s["sum_sq"][s["rows"]], before_s[s["rows"]])
    _assert_close_to_reference(s, before_p, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_steps_accumulate(device, dtype):
    """Five calls on overlapping row sets: the accumulator keeps growing, as Adagrad's does."""
    s = sample_inputs("row_adagrad_", device, dtype, n_rows=50, dim=24, n_unique=20)
    hyper = dict(lr=s["lr"], eps=s["eps"], weight_decay=s["weight_decay"])
    param, sum_sq = s["param"], s["sum_sq"]
    start = sum_sq.clone()
    for step in range(5):
        # each step against the reference from the kernel's own state
        t = sample_inputs("row_adagrad_", device, dtype, seed=step + 1, n_rows=50, dim=24, n_unique=20)
        before = param.clone()
        want = row_adagrad_ref(param, sum_sq, t["rows"], t["rows_grad"], **hyper)
        ops.row_adagrad_(param, sum_sq, t["rows"], t["rows_grad"], **hyper)
        _assert_close_to_reference(dict(param=param, sum_sq=sum_sq), before, want)
    assert bool((sum_sq >= start).all()) and bool((sum_sq > start).any())


def test_lr_zero_moves_only_the_accumulator():
    s = _sample("cpu", torch.float32, 16, "many")
    before = s["param"].clone()
    s["lr"] = 0.0
    want = row_adagrad_ref(*op_args(s))[1]
    ops.row_adagrad_(**s)
    assert torch.equal(s["param"], before)
    torch.testing.assert_close(s["sum_sq"].double(), want, rtol=(16 + 4) * UNIT_ROUNDOFF[torch.float32], atol=0)
    assert bool((s["sum_sq"][s["rows"]] > 0).all())


def test_weight_decay_is_decoupled():
    # A zero gradient: the parameter only decays, by exactly 1 - lr * weight_decay.
    s = _sample("cpu", torch.float64, 8, "many")
    s["rows_grad"].zero_()
    s["lr"], s["weight_decay"] = 0.1, 0.5
    before = s["param"].clone()
    ops.row_adagrad_(**s)
    torch.testing.assert_close(s["param"][s["rows"]], before[s["rows"]] * 0.95, rtol=1e-15, atol=0)


def test_zero_width_table_is_a_noop(device):
    param, sum_sq = torch.empty(6, 0, device=device), torch.rand(6, device=device)
    before = sum_sq.clone()
    ops.row_adagrad_(param, sum_sq, torch.tensor([1, 5], device=device), torch.empty(2, 0, device=device),
                     lr=0.1, eps=1e-10, weight_decay=0.0)
    assert torch.equal(sum_sq, before)


def test_wrapper_bumps_version_counters():
    s = _sample("cpu", torch.float32, 4, "many")
    versions = s["param"]._version, s["sum_sq"]._version
    ops.row_adagrad_(**s)
    assert s["param"]._version > versions[0] and s["sum_sq"]._version > versions[1]


def test_compiled_equals_eager():
    s = _sample("cpu", torch.bfloat16, 33, "many")
    eager = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}

    def step(param, sum_sq, rows, rows_grad):
        torch.ops.memory.row_adagrad_(param, sum_sq, rows, rows_grad, 0.05, 1e-10, 0.01)

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="aot_eager")(s["param"], s["sum_sq"], s["rows"], s["rows_grad"])
    step(eager["param"], eager["sum_sq"], eager["rows"], eager["rows_grad"])
    assert torch.equal(s["param"], eager["param"]) and torch.equal(s["sum_sq"], eager["sum_sq"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_bits_do_not_depend_on_the_thread_count(dtype):
    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            s = sample_inputs("row_adagrad_", "cpu", dtype, n_rows=5000, dim=64, n_unique=3000)
            for seed in range(3):
                g = sample_inputs("row_adagrad_", "cpu", dtype, seed=seed + 1, n_rows=5000, dim=64, n_unique=3000)
                ops.row_adagrad_(s["param"], s["sum_sq"], g["rows"], g["rows_grad"], lr=0.05, eps=1e-10,
                                 weight_decay=0.01)
            return s["param"], s["sum_sq"]
        finally:
            torch.set_num_threads(previous)

    one, two = run(1), run(2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_repeats_and_is_close_to_the_cpu(device, dtype):
    if device == "cpu":
        pytest.skip("compares another device's kernel with the CPU kernel")
    s = _sample("cpu", dtype, 129, "many")
    results = []
    for dev in ("cpu", device, device):
        moved = {name: t.to(dev) if isinstance(t, torch.Tensor) else t for name, t in s.items()}
        ops.row_adagrad_(**moved)
        results.append((moved["param"].cpu(), moved["sum_sq"].cpu()))
    cpu, first, second = results
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]), "CUDA results differ run to run"
    # The two kernels sum a row's squares in different orders: the accumulators a few
    # roundings apart, each parameter one rounding to its dtype apart (one ulp of it).
    u, u_acc = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[accumulation_dtype(dtype)]
    torch.testing.assert_close(first[1].double(), cpu[1].double(), rtol=(129 + 4) * u_acc, atol=0)
    torch.testing.assert_close(first[0].double(), cpu[0].double(), rtol=4 * u + 64 * u_acc, atol=64 * u_acc)


def test_cuda_skips_rows_out_of_range(device):
    if device == "cpu":
        pytest.skip("the CPU kernel rejects rows out of range (test_cpu_rejects_bad_rows)")
    s = _sample(device, torch.float32, 40, "many")
    s["rows"] = torch.tensor([-3, 2, 9, N_ROWS, N_ROWS + 400], device=device)
    s["rows_grad"] = s["rows_grad"][:5].clone()
    before_p, before_s = s["param"].clone(), s["sum_sq"].clone()
    ops.row_adagrad_(**s)
    changed = (s["param"] != before_p).any(1) | (s["sum_sq"] != before_s)
    assert changed.nonzero().flatten().tolist() == [2, 9]


@pytest.mark.parametrize(
    "rows,message",
    [
        ([1, 4, 4], "rows must be strictly ascending (a coalesced gradient), but rows[1] = 4 and rows[2] = 4"),
        ([4, 1, 7], "rows must be strictly ascending (a coalesced gradient), but rows[0] = 4 and rows[1] = 1"),
        ([1, 4, 10], "rows[2] = 10 is out of range for a table of 10 rows"),
        ([-2, 4, 7], "rows[0] = -2 is out of range for a table of 10 rows"),
        ([-1, 4, 7], "rows[1] = 4 follows the padding (-1) that starts at rows[0]; only -1 may follow padding"),
    ],
    ids=["duplicate", "descending", "past_the_end", "negative", "row_after_padding"],
)
def test_cpu_rejects_bad_rows(rows, message):
    """Data-dependent, so checked by the CPU kernel only, before anything is written."""
    param, sum_sq = torch.randn(10, 4), torch.rand(10)
    before = param.clone(), sum_sq.clone()
    with pytest.raises(RuntimeError) as info:
        ops.row_adagrad_(param, sum_sq, torch.tensor(rows), torch.randn(3, 4), lr=0.1, eps=1e-10, weight_decay=0.0)
    assert str(info.value).splitlines()[0] == f"memory.row_adagrad_: {message}"
    assert torch.equal(param, before[0]) and torch.equal(sum_sq, before[1])
