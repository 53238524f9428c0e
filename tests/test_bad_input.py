"""Every rejected input raises an error that names the op and the problem."""
import pytest
import torch

from memory_ext import ops


def eb(values=None, indices=None, weights=None):
    values = torch.randn(10, 4) if values is None else values
    indices = torch.randint(0, 10, (3, 2)) if indices is None else indices
    weights = torch.rand(3, 2) if weights is None else weights
    return ops.embedding_bag(values, indices, weights)


@pytest.mark.parametrize("bad,where", [(-1, (0, 1)), (10, (2, 0)), (2**40, (1, 1))])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_out_of_range_index(bad, where, index_dtype):
    if index_dtype == torch.int32 and bad > 2**31:
        pytest.skip("not representable in int32")
    idx = torch.randint(0, 10, (3, 2)).to(index_dtype)
    idx[where] = bad
    msg = rf"memory.embedding_bag: index out of range: indices\[{where[0]}, {where[1]}\] = {bad} but values has 10 rows"
    with pytest.raises(RuntimeError, match=msg):
        eb(indices=idx)
    grad = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="memory.embedding_bag_backward: index out of range"):
        ops.embedding_bag_backward(grad, torch.randn(10, 4), idx, torch.rand(3, 2), True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(values=torch.randn(10)), "values must be 2-D"),
        (dict(indices=torch.randint(0, 10, (6,))), "indices must be 2-D"),
        (dict(weights=torch.rand(3, 3)), "weights must have the shape of indices"),
        (dict(values=torch.randint(0, 3, (10, 4))), "values must be float32, bfloat16, float16 or float64"),
        (dict(indices=torch.zeros(3, 2)), "indices must be int64 or int32"),
        (dict(weights=torch.rand(3, 2, dtype=torch.float64)), "weights must be float32 or the values' dtype"),
        (dict(values=torch.randn(0, 4)), "values has no rows but indices is not empty"),
    ],
)
def test_embedding_bag_rejects(kwargs, match):
    with pytest.raises(RuntimeError, match="memory.embedding_bag: " + match):
        eb(**kwargs)


def test_embedding_bag_backward_rejects_bad_grad():
    with pytest.raises(RuntimeError, match=r"memory.embedding_bag_backward: grad_out must have shape \(tokens, dim\)"):
        ops.embedding_bag_backward(torch.randn(3, 5), torch.randn(10, 4), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))


def test_mismatched_devices():
    meta = torch.randint(0, 10, (3, 2), device="meta")
    with pytest.raises(RuntimeError, match="memory.embedding_bag: values and indices must be on the same device"):
        torch.ops.memory.embedding_bag(torch.randn(10, 4), meta, torch.rand(3, 2))
    with pytest.raises(RuntimeError, match="memory.pk_topk: query and keys must be on the same device"):
        torch.ops.memory.pk_topk(torch.randn(2, 1, 4), torch.randn(1, 2, 5, 2, device="meta"), 2)


def pk(query=None, keys=None, k=3):
    query = torch.randn(4, 2, 8) if query is None else query
    keys = torch.randn(2, 2, 5, 4) if keys is None else keys
    return ops.pk_topk(query, keys, k)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), r"k must be in \[1, n_keys = 5\], got 0"),
        (dict(k=6), r"k must be in \[1, n_keys = 5\], got 6"),
        (dict(query=torch.randn(4, 8)), "query must be 3-D"),
        (dict(keys=torch.randn(2, 5, 4)), "keys must be 4-D"),
        (dict(keys=torch.randn(2, 3, 5, 4)), "keys must be 4-D"),
        (dict(query=torch.randn(4, 2, 7)), "query width must be even"),
        (dict(query=torch.randn(4, 3, 8)), "query has 3 heads but keys has 2"),
        (dict(query=torch.randn(4, 2, 6)), "query half width 3 does not match the sub-key width 4"),
        (dict(query=torch.randn(4, 2, 8, dtype=torch.float64)), "query and keys must have the same dtype"),
        (dict(query=torch.ones(4, 2, 8, dtype=torch.int32), keys=torch.ones(2, 2, 5, 4, dtype=torch.int32)), "query must be float32"),
    ],
)
def test_pk_topk_rejects(kwargs, match):
    with pytest.raises(RuntimeError, match="memory.pk_topk: " + match):
        pk(**kwargs)
