"""pk_topk_by_sorting, the CUDA pk_topk's path for k beyond its shared memory, checked on
every device: equal to pk_topk bit for bit (its exact grids run both ops, see
test_pk_topk_exact.py), across the chunks it splits tokens into, with pk_topk's gradient
and argument checks under its own name."""
import pytest
import torch

from memory_ext import ops
from memory_ext.testing import op_args, sample_inputs


def test_chunks_of_tokens_give_the_same_answer():
    """k = n_keys = 1024: about 7,700 candidate pairs a token, so 2,300 tokens take two
    chunks of at most 2^24 candidates; the answer equals pk_topk's."""
    s = sample_inputs("pk_topk_by_sorting", "cpu", tokens=2300, heads=1, n_keys=1024, half=8, k=1024, kind="dyadic")
    got = ops.pk_topk_by_sorting(*op_args(s))
    want = ops.pk_topk(*op_args(s))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "ties"])
def test_equals_pk_topk(device, dtype, kind):
    for k in (1, 5, 16, 33):
        s = sample_inputs("pk_topk_by_sorting", device, dtype, tokens=11, heads=3, n_keys=33, half=4, k=k, kind=kind)
        got, want = ops.pk_topk_by_sorting(*op_args(s)), ops.pk_topk(*op_args(s))
        assert got[0].dtype == want[0].dtype and got[1].dtype == torch.int64
        assert torch.equal(got[1], want[1]), (dtype, kind, k)
        assert torch.equal(got[0], want[0]), (dtype, kind, k)


def test_gradients_equal_pk_topks(device):
    s = sample_inputs("pk_topk_by_sorting", device, torch.float64, tokens=7, heads=2, n_keys=12, half=3, k=5)
    grads = []
    for op in (ops.pk_topk_by_sorting, ops.pk_topk):
        query = s["query"].clone().requires_grad_()
        keys = s["keys"].clone().requires_grad_()
        scores, _ = op(query, keys, 5)
        (scores * torch.linspace(-1, 1, scores.numel(), dtype=scores.dtype, device=device).view_as(scores)).sum().backward()
        grads.append((query.grad, keys.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_gradcheck(device):
    s = sample_inputs("pk_topk_by_sorting", device, torch.float64, tokens=4, heads=2, n_keys=6, half=3, k=4)
    query, keys = s["query"].requires_grad_(), s["keys"].requires_grad_()
    assert torch.autograd.gradcheck(lambda q, kk: ops.pk_topk_by_sorting(q, kk, 4)[0], (query, keys))


def test_opcheck(device):
    s = sample_inputs("pk_topk_by_sorting", device, tokens=5, heads=2, n_keys=9, half=4, k=4)
    torch.library.opcheck(torch.ops.memory.pk_topk_by_sorting.default, op_args(s))


@pytest.mark.parametrize(
    "shape_q,shape_k,k,match",
    [
        ((4, 2, 8), (2, 2, 6, 4), 7, r"memory\.pk_topk_by_sorting: k must be in \[1, n_keys = 6\], got 7"),
        ((4, 2, 8), (3, 2, 6, 4), 2, r"memory\.pk_topk_by_sorting: query has 2 heads but keys has 3"),
        ((4, 2, 6), (2, 2, 6, 4), 2, r"memory\.pk_topk_by_sorting: query half width 3 does not match"),
    ],
)
def test_bad_input_names_the_op(shape_q, shape_k, k, match):
    with pytest.raises(RuntimeError, match=match):
        ops.pk_topk_by_sorting(torch.randn(shape_q), torch.randn(shape_k), k)
