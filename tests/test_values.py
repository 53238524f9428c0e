"""MemoryValues: the lookup against a plain-PyTorch bag, gradients, and exact state_dict
round trips with and without a shared pool."""
import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from memory_ext import MemoryValues, ProductKeyMemory
from memory_ext import distributed as md
from memory_ext.reference import embedding_bag_ref
from memory_ext.testing import tolerance


def bag_ref(table, indices, weights):
    """The float64 reference bag, left unrounded (differentiable for the gradient test)."""
    return embedding_bag_ref(table, indices, weights, rounded=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_lookup_matches_reference(dtype, index_dtype):
    torch.manual_seed(0)
    values = MemoryValues(97, 24, dtype=dtype)
    indices = torch.randint(0, 97, (13, 7), dtype=index_dtype)
    weights = torch.rand(13, 7)
    out = values(indices, weights)
    assert out.shape == (13, 24) and out.dtype == dtype
    torch.testing.assert_close(out.double(), bag_ref(values.weight, indices, weights), **tolerance(dtype, terms=7))


def test_weights_of_another_dtype_are_accepted():
    values = MemoryValues(10, 8)
    indices = torch.randint(0, 10, (4, 3))
    weights = torch.rand(4, 3, dtype=torch.float16)
    torch.testing.assert_close(values(indices, weights), values(indices, weights.float()))


def test_init_and_attributes():
    torch.manual_seed(0)
    values = MemoryValues(4096, 64)
    assert (values.n_rows, values.dim, values.process_group, values.sharded) == (4096, 64, None, False)
    assert values.weight.shape == (4096, 64)
    assert abs(values.weight.std().item() - 64**-0.5) < 0.01
    with pytest.raises(ValueError, match="n_rows and dim must be positive"):
        MemoryValues(0, 8)


def test_gradients_match_reference():
    torch.manual_seed(1)
    values = MemoryValues(31, 16, dtype=torch.float64)
    indices = torch.randint(0, 31, (9, 5))
    weights = torch.rand(9, 5, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(9, 16, dtype=torch.float64)
    values(indices, weights).backward(grad_out)
    table = values.weight.detach().clone().requires_grad_()
    w_ref = weights.detach().clone().requires_grad_()
    bag_ref(table, indices, w_ref).backward(grad_out)
    torch.testing.assert_close(values.weight.grad, table.grad)
    torch.testing.assert_close(weights.grad, w_ref.grad)


class ThreeLayers(nn.Module):
    """Three memory layers, sharing one pool or each with its own."""

    def __init__(self, shared: bool, value_dtype=torch.float32):
        super().__init__()
        pool = MemoryValues(16 * 16, 32, dtype=value_dtype) if shared else None
        self.layers = nn.ModuleList(
            ProductKeyMemory(32, n_keys=16, heads=2, k=4, values=pool, value_dtype=value_dtype) for _ in range(3)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _round_trip(model, fresh):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    size = buffer.tell()
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return size


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_shared_pool_round_trip_into_fresh_model(value_dtype):
    torch.manual_seed(0)
    model = ThreeLayers(shared=True, value_dtype=value_dtype)
    # The pool is one module under three names; the state_dict keys all view one table.
    keys = [k for k in model.state_dict() if k.endswith("values.weight")]
    assert len(keys) == 3
    assert len({model.state_dict()[k].data_ptr() for k in keys}) == 1
    with torch.no_grad():  # move away from the init so a no-op load would be caught
        model.layers[0].values.weight.add_(1.0)
    torch.manual_seed(123)
    fresh = ThreeLayers(shared=True, value_dtype=value_dtype)
    size = _round_trip(model, fresh)
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    table = model.layers[0].values.weight
    assert size < sum(unique.values()) + table.numel() * table.element_size()  # the table is stored once
    assert fresh.layers[0].values is fresh.layers[1].values is fresh.layers[2].values
    for (name, p), (fname, q) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert name == fname and p.dtype == q.dtype and torch.equal(p, q), name
    x = torch.randn(5, 32)
    assert torch.equal(model(x), fresh(x))


def test_unshared_round_trip_and_shared_into_unshared():
    torch.manual_seed(0)
    model = ThreeLayers(shared=False)
    fresh = ThreeLayers(shared=False)
    _round_trip(model, fresh)
    for p, q in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    # A shared checkpoint loads into a model whose layers have their own tables.
    shared = ThreeLayers(shared=True)
    _round_trip(shared, fresh)
    for layer in fresh.layers:
        assert torch.equal(layer.values.weight, shared.layers[0].values.weight)


def test_no_class_level_state():
    a, b = MemoryValues(8, 4), MemoryValues(8, 4)
    assert a.weight is not b.weight
    assert not any(isinstance(v, torch.Tensor) for v in vars(MemoryValues).values())


class FakeGroup:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def test_process_group_of_one_rank_is_a_plain_table():
    values = MemoryValues(10, 6, process_group=FakeGroup(1))
    assert not values.sharded and values.weight.shape == (10, 6)


def test_process_group_of_several_ranks_builds_the_sharded_class():
    # The factory picks the real ShardedValues, which needs torch.distributed: its own error
    # shows that it was reached (tests/test_distributed.py builds it on real groups).
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    assert issubclass(md.ShardedValues, MemoryValues)
    with pytest.raises(RuntimeError, match="ShardedValues: torch.distributed is not initialised"):
        MemoryValues(12, 8, dtype=torch.bfloat16, process_group=FakeGroup(2))


def test_a_subclass_is_not_silently_left_unsharded():
    class Mine(MemoryValues):
        pass

    assert type(Mine(8, 4, process_group=FakeGroup(1))) is Mine
    with pytest.raises(ValueError, match="Mine: a plain table cannot be split over a process group, got 2 ranks"):
        Mine(8, 4, process_group=FakeGroup(2))


def test_copies_keep_the_plain_class():
    values = MemoryValues(8, 4, process_group=FakeGroup(1))
    twin = copy.deepcopy(values)
    assert type(twin) is MemoryValues and twin.weight is not values.weight
    assert torch.equal(twin.weight, values.weight)
    buffer = io.BytesIO()
    torch.save(values, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is MemoryValues and torch.equal(loaded.weight, values.weight)


def test_huge_page_hint_keeps_values_and_accepts_any_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memory_ext.ops import advise_huge_pages

    big = torch.randn(5 << 20)  # 20 MiB: whole huge pages inside
    before = big.clone()
    assert advise_huge_pages(big) is big and torch.equal(big, before)
    for t in (torch.zeros(3), torch.zeros(0), torch.randn(8 << 20)[::2], torch.zeros(2, device="meta")):
        advise_huge_pages(t)  # small, empty, strided, meta: nothing to do, no error
    with FakeTensorMode():
        advise_huge_pages(torch.empty(8 << 20))
