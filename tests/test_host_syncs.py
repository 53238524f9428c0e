"""Host synchronisations in a memory layer's training step.

On CUDA a memory op waits for the device in two cases: when it reports bad indices (the
checked embedding_bag, quantized_embedding_bag and rows_to_dense, with index checks at
their default) and when embedding_bag_backward sizes its outputs (the number of rows read
is data). A layer vouches for the indices it made itself, so its step should wait only
for the second. The CPU tests record every memory op that a step dispatches, with its
arguments, and count the calls that would wait on CUDA; the CUDA tests count the waits
themselves (torch.cuda.set_sync_debug_mode) and capture a forward in a CUDA graph.
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
}
_SIZING = "memory::embedding_bag_backward"


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


@pytest.mark.parametrize("path", ["dense", "sparse", "fused"])
def test_a_layer_step_waits_only_where_the_backward_sizes_its_outputs(path):
    """Forward and backward of a layer (values and sub-keys trained): the only calls that
    would wait on CUDA are the two sizing ones (the values' and the sub-keys' gradients);
    every other lookup and dense copy runs on indices the library made, unchecked."""
    model = layer()
    optimizer = None
    if path != "dense":
        optimizer = value_optimizer(model, 1e-2, fused=path == "fused")
    x = torch.randn(6, 16)
    with MemoryOpLog() as log:
        train_step(model, x, optimizer)
    assert log.count("memory::pk_topk") == 1
    assert log.count(_SIZING) == 2, log.calls
    assert log.waits_on_cuda() == [_SIZING, _SIZING], log.calls


def test_a_decoder_step_waits_twice_per_memory_layer():
    cfg = DecoderConfig(vocab_size=50, dim=32, n_layers=4, n_heads=2, max_seq_len=16)
    cfg.memory_layers = memory_placement(4, 2)
    cfg.memory = dict(n_keys=8, heads=2, k=4)
    torch.manual_seed(0)
    model = Decoder(cfg)
    tokens = torch.randint(0, 50, (2, 16))
    with MemoryOpLog() as log:
        model(tokens).float().square().mean().backward()
    n_layers = log.count("memory::pk_topk")
    assert n_layers == len(cfg.memory_layers) == 2
    assert log.waits_on_cuda() == [_SIZING] * (2 * n_layers), log.calls


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
@pytest.mark.parametrize("path", ["dense", "sparse", "fused"])
def test_cuda_layer_step_synchronises_only_to_size_the_backward(path):
    """The waits counted by torch itself: one per embedding_bag_backward (its output size),
    none in the forward."""
    model = layer("cuda")
    optimizer = value_optimizer(model, 1e-2, fused=path == "fused") if path != "dense" else None
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
    assert len(syncs) == log.count(_SIZING) == 2, syncs


@requires_cuda
def test_cuda_graph_captures_a_layer_forward():
    """With no host synchronisation left in the forward, a layer's inference forward
    (pk_topk and the unchecked gather) is captured in a CUDA graph and replays exactly.
    The backward is not capturable: embedding_bag_backward synchronises to size its output."""
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
