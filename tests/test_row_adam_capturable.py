"""row_adam_capturable_ (the step count in a device tensor; memory_ext.ops.row_adam_ given a
tensor step) and SparseRowAdam(capturable=...).

The op must be row_adam_ with the count advanced by one (bit for bit on the CPU, and
within the coefficients' last bit on CUDA), refuse bad counts before anything changes,
and SparseRowAdam must train the same either way and resume from either kind of state.
"""
import pytest
import torch

from memory_ext import MemoryValues, ProductKeyMemory, ops
from memory_ext.nn import SparseRowAdam, value_optimizer
from memory_ext.testing import UNIT_ROUNDOFF, accumulation_dtype, sample_inputs

HYPER = dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _adam_inputs(device, dtype, n_unique, seed=0):
    """row_adam_'s tensors (param, moments, rows, rows_grad), without the step and HYPER."""
    s = sample_inputs("row_adam_", device, dtype, seed=seed, n_rows=90, dim=12, n_unique=n_unique, **HYPER)
    return {name: t for name, t in s.items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n_unique", [0, 1, 40])
def test_equals_row_adam_with_the_next_count_and_advances_it(device, dtype, n_unique):
    s = _adam_inputs(device, dtype, n_unique)
    twin = {name: t.clone() for name, t in s.items()}
    count = torch.tensor(0, dtype=torch.int64, device=device)
    for taken in range(3):
        ops.row_adam_(**s, **HYPER, step=count)
        ops.row_adam_(**twin, **HYPER, step=taken + 1)
        assert count.item() == taken + 1  # advanced even when no row is read
        for name in ("param", "exp_avg", "exp_avg_sq"):
            if device == "cpu":
                assert torch.equal(s[name], twin[name]), name
            else:  # the device's pow may round a coefficient's last bit differently
                u, u_acc = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[accumulation_dtype(dtype)]
                torch.testing.assert_close(s[name].double(), twin[name].double(), rtol=2 * u + 8 * u_acc, atol=0)


def test_padding_after_the_rows_is_skipped():
    s = _adam_inputs("cpu", torch.float32, 5)
    padded = dict(s, rows=torch.cat([s["rows"], torch.full((3,), -1)]),
                  rows_grad=torch.cat([s["rows_grad"], torch.zeros(3, 12)]))
    padded = {name: t.clone() for name, t in padded.items()}
    count, twin_count = torch.tensor(4), torch.tensor(4)
    ops.row_adam_(**s, **HYPER, step=count)
    ops.row_adam_(**padded, **HYPER, step=twin_count)
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(s[name], padded[name])


@pytest.mark.parametrize(
    "count, rows, match",
    [
        (torch.tensor(-1), None, "step .* must be >= 0 before the call, got -1"),
        (torch.tensor(2.0), None, "step must be a 0-d int64 tensor .* got a 0-D [Ff]loat"),
        (torch.tensor([2]), None, "step must be a 0-d int64 tensor .* got a 1-D"),
        (torch.tensor(2), torch.tensor([3, 1]), "row_adam_capturable_: rows must be strictly ascending"),
        (torch.tensor(2), torch.tensor([1, 90]), "row_adam_capturable_: rows\\[1\\] = 90 is out of range"),
    ],
)
@pytest.mark.parametrize("path", ["eager", "fake"])
def test_bad_input_names_the_op_and_changes_nothing(count, rows, match, path):
    s = _adam_inputs("cpu", torch.float32, 2)
    if rows is not None:
        s["rows"] = rows
    before = {name: t.clone() for name, t in s.items()} | {"count": count.clone()}
    args = (s["param"], s["exp_avg"], s["exp_avg_sq"], count, s["rows"], s["rows_grad"])
    if path == "fake":
        if rows is not None or count.dtype == torch.int64 and count.dim() == 0:
            pytest.skip("values are checked where they are read, not by the fake kernel")
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [mode.from_tensor(t) for t in args]
            with pytest.raises(Exception, match=match):
                torch.ops.memory.row_adam_capturable_(*fakes, *HYPER.values())
        return
    with pytest.raises(RuntimeError, match=match):
        ops.row_adam_(*args[:3], *args[4:], **HYPER, step=count)
    for name, t in s.items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(count, before["count"])


_NO_RESUME = object()


def _train(capturable, steps=4, resume_as=_NO_RESUME, seed=0):
    """A table trained by SparseRowAdam on sparse gradients; resume_as: at step 2 a fresh
    optimizer loads the saved state (whose groups carry the saved setting, as torch's
    optimizers restore their hyperparameters), is switched to that capturable setting and
    goes on."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(500, 16, generator=g).requires_grad_()
    opt = SparseRowAdam([table], lr=0.01, weight_decay=0.1, capturable=capturable)
    for step in range(steps):
        if step == 2 and resume_as is not _NO_RESUME:
            saved = opt.state_dict()
            opt = SparseRowAdam([table], lr=0.01, weight_decay=0.1, capturable=resume_as)
            opt.load_state_dict(saved)
            assert opt.param_groups[0]["capturable"] == capturable
            opt.param_groups[0]["capturable"] = resume_as
        rows = torch.randint(0, 500, (300,), generator=g)
        table.grad = torch.sparse_coo_tensor(rows[None], torch.randn(300, 16, generator=g), table.shape, check_invariants=True)
        opt.step()
    return table.detach(), opt


def test_sparse_row_adam_trains_alike_with_the_count_on_the_device_or_the_host():
    host, host_opt = _train(False)
    device, device_opt = _train(True)
    assert torch.equal(host, device)
    count = device_opt.state[device_opt.param_groups[0]["params"][0]]["step"]
    assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.item() == 4
    assert host_opt.state[host_opt.param_groups[0]["params"][0]]["step"] == 4
    default, default_opt = _train(None)  # the default: the device count on CUDA tables only
    assert torch.equal(host, default)
    assert default_opt.state[default_opt.param_groups[0]["params"][0]]["step"] == 4


@pytest.mark.parametrize("saved_as, resumed_as", [(True, False), (False, True), (True, True), (True, None)])
def test_a_saved_state_resumes_with_either_kind_of_count(saved_as, resumed_as):
    straight, _ = _train(False)
    resumed, opt = _train(saved_as, resume_as=resumed_as)
    assert torch.equal(straight, resumed)
    count = opt.state[opt.param_groups[0]["params"][0]]["step"]
    if resumed_as:  # loaded as saved: an int64 tensor, not torch's float32 step
        assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.item() == 4
    else:
        assert count == 4 and not isinstance(count, torch.Tensor)


def test_an_older_state_without_the_setting_loads():
    _, opt = _train(False, steps=2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["capturable"]
    table = opt.param_groups[0]["params"][0]
    fresh = SparseRowAdam([table], lr=0.01, weight_decay=0.1, capturable=True)
    fresh.load_state_dict(saved)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 7]]), torch.ones(2, 16), table.shape, check_invariants=True)
    fresh.step()
    assert fresh.state[table]["step"] == 3  # the group's setting is unset: the table's device decides (CPU: int)


def test_the_fused_update_in_fixed_shapes_reads_no_count_on_the_host():
    """A fused Adam step with capturable=True calls row_adam_capturable_ and updates the
    table exactly as the host count does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    tables = []
    for capturable in (False, True):
        torch.manual_seed(0)
        values = MemoryValues(8 * 8, 16)
        model = ProductKeyMemory(16, n_keys=8, heads=2, k=4, values=values)
        opt = value_optimizer(model, 1e-2, fused=True, static_shapes=True, max_norm=1.0)
        opt.param_groups[0]["capturable"] = capturable
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            with Names() as log:
                model(x).square().mean().backward()
            adam = [n for n in log.names if n.startswith("memory::row_adam")]
            assert adam == ["memory::row_adam_capturable_" if capturable else "memory::row_adam_"]
        tables.append(values.weight.detach().clone())
    assert torch.equal(*tables)
