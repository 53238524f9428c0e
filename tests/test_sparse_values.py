"""The sparse value path: MemoryValues(sparse_grad=True), the fused row update row_adam_ and
SparseRowAdam / value_optimizer."""

import pytest
import torch
import torch.nn.functional as F

from memory_ext import MemoryValues, ProductKeyMemory, ops
from memory_ext.model import Decoder, DecoderConfig
from memory_ext.nn import SparseRowAdam, clip_grad_norms, param_groups, value_optimizer, value_parameters
from memory_ext.reference import row_adam_ref
from memory_ext.testing import UNIT_ROUNDOFF, accumulation_dtype, op_args, sample_inputs


def shared_layers(sparse_grad, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    pool = MemoryValues(16 * 16, 24, dtype=dtype, sparse_grad=sparse_grad)
    layers = torch.nn.ModuleList(ProductKeyMemory(24, n_keys=16, heads=2, k=4, values=pool) for _ in range(3))
    return pool, layers


def run(layers, x):
    for layer in layers:
        x = x + layer(x)
    return x.square().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_gradient_equals_dense_gradient(dtype):
    x = torch.randn(5, 7, 24, dtype=dtype)
    dense_pool, dense = shared_layers(False, dtype=dtype)
    sparse_pool, sparse = shared_layers(True, dtype=dtype)
    dense.to(dtype), sparse.to(dtype)
    run(dense, x).backward()
    run(sparse, x).backward()
    g = sparse_pool.weight.grad
    assert g.is_sparse
    # Same kernels per lookup: each layer's rows carry the same bits; the three layers'
    # contributions are summed in the same order.
    torch.testing.assert_close(g.to_dense(), dense_pool.weight.grad, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    for p, q in zip(sparse.parameters(), dense.parameters(), strict=True):
        if p is not sparse_pool.weight:
            torch.testing.assert_close(p.grad, q.grad)


def test_only_rows_read_are_in_the_gradient():
    pool = MemoryValues(1000, 8, sparse_grad=True)
    indices = torch.tensor([[3, 999, 3], [42, 7, 999]])
    pool(indices, torch.rand(2, 3)).sum().backward()
    g = pool.weight.grad.coalesce()
    assert g.indices().flatten().tolist() == [3, 7, 42, 999]


def test_value_optimizer_updates_only_rows_read():
    torch.manual_seed(0)
    pool = MemoryValues(500, 8, sparse_grad=True)
    model = torch.nn.Module()
    model.values = pool
    before = pool.weight.detach().clone()
    opt = value_optimizer(model, 0.01, values_lr_scale=1.0)
    indices = torch.randint(0, 500, (16, 4))
    pool(indices, torch.rand(16, 4)).square().sum().backward()
    opt.step()
    read = torch.zeros(500, dtype=torch.bool)
    read[indices.flatten()] = True
    assert torch.equal(pool.weight[~read], before[~read]), "rows not read must not move"
    # First Adam step: each touched element moves by lr * |g| / (|g| + eps), about lr.
    moved = (pool.weight[read] - before[read]).abs()
    assert torch.allclose(moved, torch.full_like(moved, 0.01), rtol=1e-2)


def test_param_groups_leave_sparse_tables_to_the_sparse_optimizer():
    pool, layers = shared_layers(True)
    names = [g["name"] for g in param_groups(layers, 1e-3)]
    assert "values" not in names
    grouped = {id(p) for g in param_groups(layers, 1e-3) for p in g["params"]}
    assert id(pool.weight) not in grouped
    assert value_parameters(layers, sparse=True) == [pool.weight]
    assert value_parameters(layers, sparse=False) == []
    with pytest.raises(ValueError, match="value_optimizer: the model has no MemoryValues"):
        value_optimizer(torch.nn.Linear(2, 2), 1e-3)


def test_clipping_sparse_gradients_matches_dense():
    x = torch.randn(4, 6, 24)
    dense_pool, dense = shared_layers(False)
    sparse_pool, sparse = shared_layers(True)
    (100 * run(dense, x)).backward()
    (100 * run(sparse, x)).backward()
    dense_norms = clip_grad_norms(dense, 1.0)
    sparse_norms = clip_grad_norms(sparse, 1.0)
    torch.testing.assert_close(sparse_norms[1], dense_norms[1])
    assert dense_norms[1] > 1.0, "the test must actually clip"
    torch.testing.assert_close(sparse_pool.weight.grad.to_dense(), dense_pool.weight.grad, rtol=1e-5, atol=1e-7)


def test_decoder_trains_with_sparse_values_deterministically():
    def train():
        torch.manual_seed(0)
        cfg = DecoderConfig(50, dim=32, n_layers=2, n_heads=2, max_seq_len=16, memory_layers=(1,))
        cfg.memory = dict(n_keys=8, heads=2, k=4, values=MemoryValues(64, 32, sparse_grad=True))
        model = Decoder(cfg)
        dense_opt = torch.optim.AdamW(param_groups(model, 1e-2), betas=(0.9, 0.95))
        sparse_opt = value_optimizer(model, 1e-2)
        tokens = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(8):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            dense_opt.zero_grad(set_to_none=True), sparse_opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norms(model, 1.0)
            dense_opt.step(), sparse_opt.step()
            losses.append(loss.item())
        return losses, model.state_dict()

    losses, state = train()
    assert losses[-1] < losses[0]
    torch.manual_seed(0)
    initial = MemoryValues(64, 32).weight
    assert not torch.equal(state["layers.1.ffn.values.weight"], initial), "the sparse table must train"
    losses2, state2 = train()
    assert losses == losses2
    assert all(torch.equal(a, b) for a, b in zip(state.values(), state2.values(), strict=True))


def test_row_adam_with_every_row_read_matches_adamw():
    torch.manual_seed(0)
    table = torch.randn(40, 12, dtype=torch.float64)
    ours, ref = table.clone().requires_grad_(), table.clone().requires_grad_()
    opt = SparseRowAdam([ours], lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(40, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step(), ref_opt.step()
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_row_adam_is_lazy_adamw_on_the_rows_read():
    torch.manual_seed(0)
    table = torch.randn(30, 8, dtype=torch.float64)
    ours = table.clone().requires_grad_()
    opt = SparseRowAdam([ours], lr=0.1, betas=(0.9, 0.95))
    # Reference: a dense AdamW per row that only ever sees that row's steps, with the
    # optimizer's global step count in the bias correction.
    m, v, ref = torch.zeros_like(table), torch.zeros_like(table), table.clone()
    for step in range(1, 5):
        rows = torch.tensor([1, 4, 7] if step % 2 else [4, 9])
        vals = torch.randn(len(rows), 8, dtype=torch.float64)
        ours.grad = torch.sparse_coo_tensor(rows[None], vals, table.shape, check_invariants=True)
        before = ours.detach().clone()
        m_before = opt.state[ours]["exp_avg"].clone() if opt.state else torch.zeros_like(table)
        opt.step()
        m[rows] = m[rows] + 0.1 * (vals - m[rows])
        v[rows] = 0.95 * v[rows] + 0.05 * vals * vals
        denom = v[rows].sqrt() / (1 - 0.95**step) ** 0.5 + 1e-8
        ref[rows] = ref[rows] - 0.1 / (1 - 0.9**step) * m[rows] / denom
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-12, atol=1e-12)
        untouched = torch.ones(30, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(ours.detach()[untouched], before[untouched])
        assert torch.equal(opt.state[ours]["exp_avg"][untouched], m_before[untouched])
        torch.testing.assert_close(opt.state[ours]["exp_avg"], m, rtol=1e-12, atol=1e-12)


def test_row_adam_bf16_table_keeps_float32_moments():
    table = torch.randn(20, 8).to(torch.bfloat16).requires_grad_()
    opt = SparseRowAdam([table], lr=0.01)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[2, 5]]), torch.randn(2, 8).to(torch.bfloat16), (20, 8), check_invariants=True)
    before = table.detach().clone()
    opt.step()
    assert opt.state[table]["exp_avg"].dtype == torch.float32
    assert not torch.equal(table.detach()[[2, 5]], before[[2, 5]])
    assert torch.equal(table.detach()[[0, 1, 3]], before[[0, 1, 3]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_adam_is_deterministic_across_threads_and_resumes_from_state_dict(dtype):
    def run(threads, split_at=None):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            g = torch.Generator().manual_seed(0)
            table = torch.randn(5000, 64, generator=g).to(dtype).requires_grad_()
            opt = SparseRowAdam([table], lr=0.01)
            for step in range(4):
                if step == split_at:  # a checkpoint: fresh optimizer loaded from the saved state
                    saved = opt.state_dict()
                    opt = SparseRowAdam([table], lr=0.01)
                    opt.load_state_dict(saved)
                rows = torch.randint(0, 5000, (3000,), generator=g)
                vals = torch.randn(3000, 64, generator=g).to(dtype)
                table.grad = torch.sparse_coo_tensor(rows[None], vals, table.shape, check_invariants=True)
                opt.step()
            return table.detach()
        finally:
            torch.set_num_threads(previous)

    one = run(1)
    assert torch.equal(one, run(2))
    assert torch.equal(one, run(2, split_at=2))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(rows=torch.tensor([3, 1])), "strictly ascending"),
        (dict(rows=torch.tensor([1, 99])), "out of range"),
        (dict(exp_avg=torch.zeros(10, 4, dtype=torch.float64)), "exp_avg and exp_avg_sq must be"),
        (dict(rows_grad=torch.zeros(2, 5)), "rows_grad must have shape"),
        (dict(step=0), "step must be >= 1"),
    ],
)
def test_row_adam_rejects_bad_input(change, match):
    args = dict(param=torch.zeros(10, 4), exp_avg=torch.zeros(10, 4), exp_avg_sq=torch.zeros(10, 4),
                rows=torch.tensor([1, 3]), rows_grad=torch.zeros(2, 4), step=1)
    args.update(change)
    step = args.pop("step")
    with pytest.raises(RuntimeError, match=match):
        ops.row_adam_(**args, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=step)


def test_row_adam_opcheck():
    args = op_args(sample_inputs("row_adam_", "cpu", n_rows=10, dim=4, n_unique=3, step=1, weight_decay=0.0))
    torch.library.opcheck(torch.ops.memory.row_adam_.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_row_adam_matches_reference(device, dtype):
    """The update of the rows read against AdamW's formula in float64: moments (float32 or
    float64) within a few roundings, the parameter within one rounding to its dtype plus
    a few float32 roundings of the update; the other rows untouched, bit for bit."""
    s = sample_inputs("row_adam_", device, dtype, n_rows=300, dim=40, n_unique=120, step=7)
    before = [t.clone() for t in (s["param"], s["exp_avg"], s["exp_avg_sq"])]
    want = row_adam_ref(*op_args(s))
    ops.row_adam_(**s)
    untouched = torch.ones(300, dtype=torch.bool, device=device)
    untouched[s["rows"]] = False
    for got, old, ref in zip((s["param"], s["exp_avg"], s["exp_avg_sq"]), before, want, strict=True):
        assert torch.equal(got[untouched], old[untouched])
        u = UNIT_ROUNDOFF[got.dtype]
        u_acc = UNIT_ROUNDOFF[accumulation_dtype(dtype)]
        # the parameter moves by about lr = 0.01 per step; its error is that of the update
        torch.testing.assert_close(got.double(), ref, rtol=2 * u + 16 * u_acc, atol=16 * u_acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_adam_on_each_device_matches_the_cpu_kernel(device, dtype):
    if device == "cpu":
        pytest.skip("compares another device's kernel with the CPU kernel")
    s = sample_inputs("row_adam_", "cpu", dtype, n_rows=300, dim=40, n_unique=120, step=7)
    results = []
    for dev in ("cpu", device):
        moved = {name: t.to(dev) if isinstance(t, torch.Tensor) else t for name, t in s.items()}
        ops.row_adam_(**moved)
        results.append([moved[name].cpu() for name in ("param", "exp_avg", "exp_avg_sq")])
    # Either side may contract multiply-adds into FMAs: a few float32 roundings apart, then
    # one rounding to the parameter's dtype each (one ulp of it).
    for ours, cpu in zip(results[1], results[0], strict=True):
        u, u_acc = UNIT_ROUNDOFF[ours.dtype], UNIT_ROUNDOFF[accumulation_dtype(dtype)]
        torch.testing.assert_close(ours.double(), cpu.double(), rtol=4 * u + 16 * u_acc, atol=16 * u_acc)


def test_a_step_between_forward_and_backward_is_caught():
    pool = MemoryValues(50, 8, sparse_grad=True)
    weights = torch.rand(4, 3, requires_grad=True)
    out = pool(torch.randint(0, 50, (4, 3)), weights)
    opt = SparseRowAdam([pool.weight], lr=0.1)
    pool.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.ones(2, 8), (50, 8), check_invariants=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_coalesced_skips_the_sort_only_when_rows_are_already_unique_and_ascending():
    from memory_ext.nn.sparse_adam import coalesced

    def sparse(rows):
        rows = torch.tensor(rows)
        return torch.sparse_coo_tensor(rows[None], torch.ones(len(rows), 2), (10, 2), check_invariants=True)

    ordered = coalesced(sparse([1, 4, 7]))
    assert ordered.is_coalesced() and ordered.indices()[0].tolist() == [1, 4, 7]
    for rows in ([4, 1, 7], [1, 4, 4, 7]):  # unsorted; a repeated row
        fixed = coalesced(sparse(rows))
        assert fixed.is_coalesced()
        assert torch.equal(fixed.to_dense(), sparse(rows).to_dense())
        assert (fixed.indices()[0].diff() > 0).all()
    with pytest.raises(ValueError, match="one sparse dimension"):
        coalesced(torch.eye(3).to_sparse())
