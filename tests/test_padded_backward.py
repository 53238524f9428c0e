"""embedding_bag_backward_padded (the sparse backward in outputs of a size known before the
call), the row optimizers on its padded rows, and the fused value update in fixed shapes.

The padded op must hold embedding_bag_backward's results bit for bit, then -1 rows and
zero gradients; index -1 must act as a lookup that is not there; padded parts merged by
one more call must equal torch's sparse sum; and a fused step in fixed shapes must update
a model exactly as the fused step of sized gradients does, without any call that would
wait on CUDA.
"""
import pytest
import torch
from test_host_syncs import _PADDED, _SIZING, MemoryOpLog

from memory_ext import MemoryValues, ops
from memory_ext.model import Decoder, DecoderConfig, memory_placement
from memory_ext.nn import value_optimizer
from memory_ext.sparse_rows import merged_padded_rows
from memory_ext.testing import op_args, sample_inputs


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def case(device, dtype, index_dtype, tokens, bag, rows, dim, seed=0, weight_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, dim, generator=gen).to(dtype)
    indices = torch.randint(0, rows, (tokens, bag), generator=gen).to(index_dtype)
    weights = torch.randn(tokens, bag, generator=gen).to(weight_dtype)
    grad_out = torch.randn(tokens, dim, generator=gen).to(dtype)
    return [t.to(device) for t in (grad_out, values, indices, weights)]


def check_padded(grad_out, values, indices, weights, need_weights_grad):
    """The padded outputs against embedding_bag_backward's."""
    rows, rows_grad, weights_grad = ops.embedding_bag_backward(grad_out, values, indices, weights, need_weights_grad)
    p_rows, p_grad, p_weights_grad, count = ops.embedding_bag_backward_padded(
        grad_out, values, indices, weights, need_weights_grad
    )
    capacity = min(indices.numel(), values.shape[0])
    assert p_rows.shape == (capacity,) and p_grad.shape == (capacity, values.shape[1])
    assert count.shape == () and count.dtype == torch.int64 and count.device == values.device
    n = int(count)
    assert n == rows.shape[0]
    assert torch.equal(p_rows[:n], rows) and bool((p_rows[n:] == -1).all())
    assert bits_equal(p_grad[:n], rows_grad)
    assert bits_equal(p_grad[n:], torch.zeros_like(p_grad[n:]))
    assert bits_equal(p_weights_grad, weights_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    "tokens,bag,rows,dim",
    [(7, 5, 300, 16), (40, 8, 50, 33), (64, 16, 1 << 12, 64), (3, 1, 2, 8), (9, 4, 9 * 4, 1)],
)
def test_padded_equals_the_sparse_backward(device, dtype, index_dtype, tokens, bag, rows, dim):
    for need in (True, False):
        args = case(device, dtype, index_dtype, tokens, bag, rows, dim, seed=tokens + rows)
        check_padded(*args, need)


def test_zero_width_rows_and_non_contiguous_inputs(device):
    check_padded(*case(device, torch.float32, torch.int64, 6, 3, 20, 0), True)
    grad_out, values, indices, weights = case(device, torch.float32, torch.int64, 12, 5, 30, 8, seed=4)
    # Views with strides: every other token of grad_out, indices and weights, and values'
    # columns read out of a wider table.
    wide = torch.randn(30, 16, generator=torch.Generator().manual_seed(5)).to(device)
    strided = (grad_out[::2], wide[:, ::2], indices[::2], weights[::2])
    assert not any(t.is_contiguous() for t in strided)
    check_padded(*strided, True)
    if device == "cpu":  # the bags-of-one path of -1 lookups, on views too
        padded = indices.clone()
        padded[::3, 2] = -1
        got = ops.embedding_bag_backward_padded(grad_out[::2], wide[:, ::2], padded[::2], weights[::2], True)
        want = ops.embedding_bag_backward_padded(
            *(t.contiguous() for t in (grad_out[::2], wide[:, ::2], padded[::2], weights[::2])), True
        )
        assert all(bits_equal(a, b) for a, b in zip(got, want, strict=True))


def test_padded_with_float32_weights_of_16_bit_tables(device):
    args = case(device, torch.bfloat16, torch.int64, 33, 7, 100, 24, weight_dtype=torch.float32)
    check_padded(*args, True)


def test_no_lookups_and_a_hot_row(device):
    grad_out, values, indices, weights = case(device, torch.float32, torch.int64, 0, 4, 10, 8)
    check_padded(grad_out, values, indices, weights, True)
    rows, rows_grad, weights_grad, count = ops.embedding_bag_backward_padded(grad_out, values, indices, weights)
    assert rows.shape == (0,) and rows_grad.shape == (0, 8) and int(count) == 0
    grad_out, values, indices, weights = case(device, torch.float32, torch.int64, 200, 8, 1000, 8, seed=2)
    indices[:, :6] = 17  # one row in 1200 of 1600 lookups: runs longer than a segment
    check_padded(grad_out, values, indices, weights, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_minus_one_is_a_lookup_that_is_not_there(device, dtype):
    """Padding lookups change nothing: the other rows' sums are the bits of a call without
    them (as bags of one, in the same order), and their weight gradient is zero."""
    grad_out, values, indices, weights = case(device, dtype, torch.int64, 30, 6, 40, 16, seed=3)
    padded_indices = indices.clone()
    padded_indices[::4, 1] = -1
    padded_indices[2] = -1
    rows, rows_grad, weights_grad, count = ops.embedding_bag_backward_padded(
        grad_out, values, padded_indices, weights, True
    )
    kept = (padded_indices != -1).flatten().nonzero().squeeze(1)
    want = ops.embedding_bag_backward(
        grad_out.repeat_interleave(6, dim=0)[kept], values, indices.flatten()[kept, None],
        weights.flatten()[kept, None], True,
    )
    n = int(count)
    assert torch.equal(rows[:n], want[0]) and bool((rows[n:] == -1).all())
    assert bits_equal(rows_grad[:n], want[1])
    want_weights_grad = torch.zeros(30 * 6, dtype=weights.dtype, device=device)
    want_weights_grad[kept] = want[2].flatten()
    assert bits_equal(weights_grad, want_weights_grad.view(30, 6))


def test_every_lookup_padding(device):
    grad_out, values, indices, weights = case(device, torch.float32, torch.int64, 5, 3, 20, 4)
    rows, rows_grad, weights_grad, count = ops.embedding_bag_backward_padded(
        grad_out, values, torch.full_like(indices, -1), weights
    )
    assert int(count) == 0 and bool((rows == -1).all()) and not rows_grad.any() and not weights_grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_parts_equal_torchs_sparse_sum(device, dtype):
    """Three reads of one table, merged by one more padded call, against autograd's way:
    the sparse gradients added (concatenated) and coalesced."""
    values = torch.randn(60, 12, device=device).to(dtype)
    parts, sparse = [], []
    for seed in range(3):
        grad_out, _, indices, weights = case(device, dtype, torch.int64, 11, 4, 60, 12, seed=10 + seed)
        rows, rows_grad, _, _ = ops.embedding_bag_backward_padded(grad_out, values, indices, weights, False)
        parts.append((rows, rows_grad))
        r, g, _ = ops.embedding_bag_backward(grad_out, values, indices, weights, False)
        sparse.append(torch.sparse_coo_tensor(r[None], g, values.shape))
    rows, rows_grad = merged_padded_rows(values, parts)
    want = (sparse[0] + sparse[1] + sparse[2]).coalesce()
    n = want.indices().shape[1]
    assert rows.shape == (min(3 * 11 * 4, 60),)
    assert torch.equal(rows[:n], want.indices()[0]) and bool((rows[n:] == -1).all())
    if dtype == torch.float32:  # float32 sums of float32 parts in the same order: the same bits
        assert bits_equal(rows_grad[:n], want.values())
    else:  # summed in float32 and rounded once, where torch may round each sum
        torch.testing.assert_close(rows_grad[:n].float(), want.values().float(), rtol=1e-2, atol=1e-2)
    assert not rows_grad[n:].any()
    assert merged_padded_rows(values, parts[:1]) == parts[0]


def test_errors_name_the_op():
    grad_out, values, indices, weights = case("cpu", torch.float32, torch.int64, 6, 5, 30, 7)
    bad = indices.clone()
    bad[4, 3] = -1
    bad[2, 1] = 30  # reported at its place in the caller's indices, padding or not
    with pytest.raises(RuntimeError, match=r"embedding_bag_backward_padded: index out of range: indices\[2, 1\] = 30"):
        ops.embedding_bag_backward_padded(grad_out, values, bad, weights)
    bad[4, 3] = 5
    with pytest.raises(RuntimeError, match=r"embedding_bag_backward_padded: index out of range: indices\[2, 1\]"):
        ops.embedding_bag_backward_padded(grad_out, values, bad, weights)
    bad[2, 1] = -2  # only -1 is padding
    with pytest.raises(RuntimeError, match=r"embedding_bag_backward_padded: index out of range: indices\[2, 1\] = -2"):
        ops.embedding_bag_backward_padded(grad_out, values, bad, weights)
    with pytest.raises(RuntimeError, match="embedding_bag_backward_padded: grad_out must have shape"):
        ops.embedding_bag_backward_padded(grad_out[:, :3], values, indices, weights)
    with pytest.raises(RuntimeError, match="embedding_bag_backward_padded"):
        torch.compile(ops.embedding_bag_backward_padded, fullgraph=True)(grad_out[:, :3], values, indices, weights)


def test_opcheck_and_compile(device):
    for need in (True, False):
        s = sample_inputs("embedding_bag_backward_padded", device, tokens=6, bag=5, rows=30, dim=7,
                          need_weights_grad=need)
        torch.library.opcheck(torch.ops.memory.embedding_bag_backward_padded.default, op_args(s))
        eager = ops.embedding_bag_backward_padded(*op_args(s))
        compiled = torch.compile(ops.embedding_bag_backward_padded, fullgraph=True, dynamic=True)(*op_args(s))
        assert all(bits_equal(a, b) for a, b in zip(eager, compiled, strict=True))


# The row optimizers on padded rows.


@pytest.mark.parametrize("rule", ["adam", "adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_optimizers_skip_the_padding(device, rule, dtype):
    grad_out, values, indices, weights = case(device, dtype, torch.int64, 20, 4, 500, 16, seed=7)
    rows, rows_grad, _, count = ops.embedding_bag_backward_padded(grad_out, values, indices, weights, False)
    n = int(count)
    assert n < rows.shape[0]  # the case has padding

    def step(rows, rows_grad):
        param = values.clone()
        state = [torch.zeros(500, 16, device=device), torch.zeros(500, 16, device=device)]
        if rule == "adam":
            ops.row_adam_(param, *state, rows, rows_grad, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.1, step=1)
        else:
            state = [torch.zeros(500, device=device)]
            ops.row_adagrad_(param, *state, rows, rows_grad, lr=0.1, eps=1e-8, weight_decay=0.1)
        return [param, *state]

    for got, want in zip(step(rows, rows_grad), step(rows[:n], rows_grad[:n]), strict=True):
        assert bits_equal(got, want)


@pytest.mark.parametrize("rule", ["adam", "adagrad"])
def test_row_optimizers_reject_rows_after_padding(rule):
    param = torch.randn(10, 4)
    rows = torch.tensor([1, 3, -1, 5])
    call = {
        "adam": lambda: ops.row_adam_(param, torch.zeros(10, 4), torch.zeros(10, 4), rows, torch.randn(4, 4),
                                      lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1),
        "adagrad": lambda: ops.row_adagrad_(param, torch.zeros(10), rows, torch.randn(4, 4), lr=0.1, eps=1e-8,
                                            weight_decay=0.0),
    }[rule]
    before = param.clone()
    with pytest.raises(RuntimeError, match=r"row_ada\w+: rows\[3\] = 5 follows the padding \(-1\) that starts at rows\[2\]"):
        call()
    assert torch.equal(param, before)


# The fused update in fixed shapes.


def train(static_shapes, rule, max_norm, dtype, steps=3):
    """A decoder whose two memory layers share one pool (the pool is read twice a step)."""
    cfg = DecoderConfig(vocab_size=50, dim=32, n_layers=4, n_heads=2, max_seq_len=16)
    cfg.memory_layers = memory_placement(4, 2)
    cfg.memory = dict(n_keys=8, heads=2, k=4)
    torch.manual_seed(0)
    model = Decoder(cfg).to(dtype)
    values = value_optimizer(model, 1e-2, rule=rule, fused=True, max_norm=max_norm, static_shapes=static_shapes)
    others = torch.optim.AdamW([p for n, p in model.named_parameters() if "values" not in n], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    with MemoryOpLog() as log:
        for _ in range(steps):
            model(torch.randint(0, 50, (2, 16), generator=gen)).float().square().mean().backward()
            values.step()
            others.step()
            others.zero_grad()
    return model, log


@pytest.mark.parametrize("rule", ["adam", "adagrad"])
@pytest.mark.parametrize("max_norm", [None, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_in_fixed_shapes_updates_as_the_sized_path(rule, max_norm, dtype):
    """The same model after three steps, bit for bit, and no call that would wait on CUDA:
    two padded lookups and one merge per step, no sized backward."""
    sized, sized_log = train(False, rule, max_norm, dtype)
    fixed, fixed_log = train(True, rule, max_norm, dtype)
    assert sized_log.count(_SIZING) == 6 and sized_log.count(_PADDED) == 0
    assert fixed_log.count(_SIZING) == 0 and fixed_log.count(_PADDED) == 9
    assert fixed_log.waits_on_cuda() == []
    for (name, p), q in zip(sized.named_parameters(), fixed.parameters(), strict=True):
        assert bits_equal(p.detach(), q.detach()), name
    if max_norm is not None:
        pool = [m for m in fixed.modules() if isinstance(m, MemoryValues)][0]
        sized_pool = [m for m in sized.modules() if isinstance(m, MemoryValues)][0]
        torch.testing.assert_close(pool.fused.last_norm, sized_pool.fused.last_norm)


def test_static_shapes_default_and_errors():
    table = MemoryValues(16, 4)
    model = torch.nn.ModuleDict(dict(t=table))
    opt = value_optimizer(model, 1e-2, rule="adagrad", fused=True)
    assert table.fused.static_shapes is False  # a CPU table: sizing costs no wait
    if torch.cuda.is_available():  # unset, it follows the table to where it is now
        table.cuda()
        assert table.fused.static_shapes is True
        table.cpu()
    table.fuse(opt, static_shapes=True)
    assert table.fused.static_shapes is True
    with pytest.raises(ValueError, match="static_shapes applies to the fused path only"):
        value_optimizer(model, 1e-2, static_shapes=True)


def test_a_row_optimizer_of_ones_own_gets_padding_only_if_it_says_it_skips_it():
    """A RowOptimizer subclass that does not set takes_padded_rows never sees -1 rows: the
    fixed shapes are not its default (on CUDA either) and asking for them is an error."""
    from memory_ext.nn import RowOptimizer

    class PlainSGD(RowOptimizer):
        def __init__(self, params, lr):
            super().__init__(params, dict(lr=lr))

        def update_rows(self, p, group, rows, rows_grad):
            assert bool((rows >= 0).all())
            p.index_add_(0, rows, rows_grad, alpha=-group["lr"])

    table = MemoryValues(16, 4)
    opt = PlainSGD([table.weight], lr=0.1)
    with pytest.raises(ValueError, match="static_shapes=True needs a row optimizer that skips -1 padding"):
        table.fuse(opt, static_shapes=True)
    table.fuse(opt)
    assert table.fused.static_shapes is False
    if torch.cuda.is_available():
        table.cuda()
        assert table.fused.static_shapes is False
        table.cpu()
    table.sparse_grad = True
    before = table.weight.detach().clone()
    table(torch.tensor([[1, 3]]), torch.ones(1, 2)).sum().backward()
    assert not torch.equal(table.weight.detach(), before)
