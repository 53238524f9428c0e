"""Host synchronisations in a memory layer's training step.

On CUDA a memory op waits for the device in two cases: when it reports bad indices (the
checked embedding_bag, quantized_embedding_bag, embedding_bag_backward_dense and
rows_to_dense, with index checks at their default) and when embedding_bag_backward sizes
its sparse outputs (the number of rows read is data). A layer vouches for the indices it
made itself, and its dense gradients (the sub-keys', and the values' on the dense path)
come from embedding_bag_backward_dense, whose size is known: a step waits only where the
sparse or fused value path sizes the values' row gradient, once per lookup, and never on
the dense path or on the fused path in fixed shapes (embedding_bag_backward_padded). The
CPU tests record every memory op that a step dispatches, with its arguments, and count
the calls that would wait on CUDA; the CUDA tests count the waits
themselves (torch.cuda.set_sync_debug_mode) and capture a forward, and a whole training
step on the dense path and on the fused path in fixed shapes (row-wise Adagrad, and Adam
with its step count on the device), in a CUDA graph.
"""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memory_ext
from memory_ext import MemoryValues, ProductKeyMemory
from memory_ext.model import Decoder, DecoderConfig, memory_placement
from memory_ext.nn import value_optimizer

from conftest import requires_cuda

# op -> the argument that says whether the CUDA kernel reports bad indices (and so waits)
_CHECK_ARGUMENT = {
    "memory::embedding_bag": "check_indices",
    "memory::quantized_embedding_bag": "check_indices",
    "memory::rows_to_dense": "check_rows",
    "memory::embedding_bag_backward_dense": "check_indices",
}
_DENSE = "memory::embedding_bag_backward_dense"
_SIZING = "memory::embedding_bag_backward"
_PADDED = "memory::embedding_bag_backward_padded"  # fixed size: never waits


class MemoryOpLog(TorchDispatchMode):
    """Every memory op dispatched inside the block, as (name, {argument: value})."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("memory::"):
            values = {}
            for i, a in enumerate(func._schema.arguments):
                values[a.name] = args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
            self.calls.append((name, values))
        return func(*args, **kwargs)

    def waits_on_cuda(self) -> list[str]:
        """The calls that would wait for the device on CUDA with index checks on."""
        waits = []
        for name, values in self.calls:
            if name == _SIZING or (name in _CHECK_ARGUMENT and values[_CHECK_ARGUMENT[name]]):
                waits.append(name)
        return waits

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)


def layer(device="cpu", **values_kwargs):
    torch.manual_seed(0)
    values = MemoryValues(8 * 8, 16, device=device, **values_kwargs)
    return ProductKeyMemory(16, n_keys=8, heads=2, k=4, values=values, device=device)


def train_step(model, x, optimizer=None):
    loss = model(x).square().mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("path", ["dense", "sparse", "fused", "fused-fixed"])
def test_a_layer_step_waits_only_where_the_sparse_values_are_sized(path):
    """Forward and backward of a layer (values and sub-keys trained): on the dense path no
    call would wait on CUDA (both gradients dense, of known size); on the sparse and fused
    paths only the values' row gradient is sized, and on the fused path in fixed shapes
    (the default on CUDA) nothing is. Every lookup and dense gradient runs on indices the
    library made, unchecked."""
    model = layer()
    optimizer = None
    if path != "dense":
        optimizer = value_optimizer(model, 1e-2, fused=path != "sparse",
                                    static_shapes=True if path == "fused-fixed" else None)
    x = torch.randn(6, 16)
    with MemoryOpLog() as log:
        train_step(model, x, optimizer)
    assert log.count("memory::pk_topk") == 1
    want_sizing = 1 if path in ("sparse", "fused") else 0
    assert log.count(_SIZING) == want_sizing, log.calls
    assert log.count(_PADDED) == (1 if path == "fused-fixed" else 0), log.calls
    assert log.count(_DENSE) == (2 if path == "dense" else 1), log.calls  # the sub-keys' (and the values')
    assert log.waits_on_cuda() == [_SIZING] * want_sizing, log.calls


@pytest.mark.parametrize("sparse", [False, True])
def test_a_decoder_step_waits_once_per_sparse_lookup_and_never_on_the_dense_path(sparse):
    cfg = DecoderConfig(vocab_size=50, dim=32, n_layers=4, n_heads=2, max_seq_len=16)
    cfg.memory_layers = memory_placement(4, 2)
    cfg.memory = dict(n_keys=8, heads=2, k=4)
    if sparse:
        cfg.memory["values"] = MemoryValues(8 * 8, 32, sparse_grad=True)
    torch.manual_seed(0)
    model = Decoder(cfg)
    tokens = torch.randint(0, 50, (2, 16))
    with MemoryOpLog() as log:
        model(tokens).float().square().mean().backward()
    n_layers = log.count("memory::pk_topk")
    assert n_layers == len(cfg.memory_layers) == 2
    assert log.waits_on_cuda() == [_SIZING] * (n_layers if sparse else 0), log.calls


def test_the_dense_backward_equals_the_sparse_one_placed_in_a_table():
    """embedding_bag_backward_dense is rows_to_dense of embedding_bag_backward, bit for bit,
    with the same weight gradient; a user's bad index is reported, naming the op."""
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(30, 6, generator=gen)
    indices = torch.randint(0, 30, (9, 4), generator=gen)
    weights = torch.randn(9, 4, generator=gen)
    grad_out = torch.randn(9, 6, generator=gen)
    dense, weights_grad = memory_ext.ops.embedding_bag_backward_dense(grad_out, values, indices, weights)
    rows, rows_grad, want_weights_grad = memory_ext.ops.embedding_bag_backward(grad_out, values, indices, weights)
    assert torch.equal(dense, memory_ext.ops.rows_to_dense(rows, rows_grad, 30))
    assert torch.equal(weights_grad, want_weights_grad)
    with pytest.raises(RuntimeError, match="embedding_bag_backward_dense: index out of range"):
        memory_ext.ops.embedding_bag_backward_dense(grad_out, values, indices + 30, weights)


def test_a_users_own_indices_are_still_checked():
    """Direct calls keep their checks by default, and on the CPU a call that vouches for
    bad indices still gets the error (the CPU kernel always checks)."""
    values = torch.randn(10, 4)
    indices = torch.tensor([[1, 10]])
    weights = torch.ones(1, 2)
    with MemoryOpLog() as log:
        with pytest.raises(RuntimeError, match="out of range"):
            memory_ext.ops.embedding_bag(values, indices, weights)
    assert log.waits_on_cuda() == ["memory::embedding_bag"]
    with pytest.raises(RuntimeError, match="out of range"):
        memory_ext.ops.embedding_bag(values, indices, weights, check_indices=False)
    with pytest.raises(RuntimeError, match="rows_to_dense"):
        memory_ext.ops.rows_to_dense(torch.tensor([3, 1]), torch.randn(2, 4), 10, check_rows=False)


def test_unchecked_calls_compute_the_same():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(40, 8, generator=gen)
    indices = torch.randint(0, 40, (7, 5), generator=gen)
    weights = torch.randn(7, 5, generator=gen)
    checked = memory_ext.ops.embedding_bag(values, indices, weights)
    unchecked = memory_ext.ops.embedding_bag(values, indices, weights, check_indices=False)
    assert torch.equal(checked, unchecked)


@requires_cuda
@pytest.mark.parametrize("path", ["dense", "sparse", "fused", "fused-sized"])
def test_cuda_layer_step_synchronises_only_to_size_the_sparse_backward(path):
    """The waits counted by torch itself: one per embedding_bag_backward (the sparse value
    gradient's size), none in the forward, none at all on the dense path and on the fused
    path in fixed shapes (the default on CUDA)."""
    model = layer("cuda")
    optimizer = None
    if path == "sparse":
        optimizer = value_optimizer(model, 1e-2)
    elif path.startswith("fused"):
        optimizer = value_optimizer(model, 1e-2, fused=True, static_shapes=False if path == "fused-sized" else None)
    x = torch.randn(64, 16, device="cuda")
    train_step(model, x, optimizer)  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    with MemoryOpLog() as log, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = model(x)
            forward_waits = len(caught)
            out.square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert forward_waits == 0, syncs
    assert len(syncs) == log.count(_SIZING) == (1 if path in ("sparse", "fused-sized") else 0), syncs


@requires_cuda
def test_cuda_graph_captures_a_layer_forward():
    """With no host synchronisation left in the forward, a layer's inference forward
    (pk_topk and the unchecked gather) is captured in a CUDA graph and replays exactly."""
    model = layer("cuda").eval()
    static_x = torch.randn(32, 16, device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(static_x)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        fresh = torch.randn(32, 16, device="cuda")
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, model(fresh))


def check_captured_step(make):
    """Captures one training step of a model from make() -> (model, optimizer) as a CUDA
    graph; each replay must compute what the same step computes eagerly on a twin from
    make(), warmed up alike (lazy state, launch caches) outside the capture."""
    (model, optimizer), (twin, twin_optimizer) = make(), make()
    static_x = torch.randn(32, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for m, o in ((model, optimizer), (twin, twin_optimizer)):
            for _ in range(3):
                o.zero_grad(set_to_none=True)
                m(static_x).square().mean().backward()
                o.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model(static_x).square().mean()
        static_loss.backward()
        optimizer.step()
    for seed in range(3):
        x = torch.randn(32, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        static_x.copy_(x)
        graph.replay()
        twin_optimizer.zero_grad(set_to_none=True)
        loss = twin(x).square().mean()
        loss.backward()
        twin_optimizer.step()
        torch.testing.assert_close(static_loss, loss)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@requires_cuda
def test_cuda_graph_captures_a_whole_training_step_on_the_dense_path():
    """Forward, backward (dense value and sub-key gradients, no host synchronisation) and a
    capturable AdamW step are captured as one CUDA graph."""

    def make():
        model = layer("cuda")
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, capturable=True)

    check_captured_step(make)


@requires_cuda
@pytest.mark.parametrize("rule", ["adagrad", "adam"])
def test_cuda_graph_captures_a_whole_training_step_on_the_fused_path(rule):
    """The values' fused row-wise Adagrad or Adam in fixed shapes (padded row gradients, no
    host synchronisation; Adam's step count on the device, SparseRowAdam's capturable
    default on CUDA, so each replay takes the next count) and a capturable AdamW for the
    rest, captured as one CUDA graph (the fused update runs inside the backward; the
    AdamW's step() is the graph's last call)."""

    def make():
        model = layer("cuda")
        value_optimizer(model, 1e-2, rule=rule, fused=True, max_norm=1.0)
        others = [p for n, p in model.named_parameters() if "values" not in n]
        return model, torch.optim.AdamW(others, lr=1e-2, capturable=True)

    check_captured_step(make)
