"""Row-wise quantized tables: quantize_rows / dequantize_rows, quantized_embedding_bag against a
dequantize-then-bag float64 reference, opcheck, torch.compile, determinism, and the
QuantizedMemoryValues module in a model (state_dict round trip, shared pools)."""
import pytest
import torch

from memory_ext import ops
from memory_ext.model import Decoder, DecoderConfig
from memory_ext.nn import (
    MemoryValues,
    ProductKeyMemory,
    QuantizedMemoryValues,
    dequantize_rows,
    quantize_rows,
    quantize_values,
)

CODES = ["uint8", "float8_e4m3fn"]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# dims of every kernel path: chunks in registers (16-128, multiples of 256) and rows in
# flight (the rest, odd ones leaving row tails unaligned)
DIMS = [16, 32, 64, 100, 128, 256, 333, 512]


def table(rows, dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # rows of different ranges and offsets, so that each row gets its own scale and bias
    spread = torch.rand(rows, 1, generator=g) * 4 + 0.01
    return (torch.randn(rows, dim, generator=g) * spread + torch.randn(rows, 1, generator=g)).to(dtype)


def lookups(rows, tokens, bag, seed=0, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, rows, (tokens, bag), generator=g).to(index_dtype), torch.randn(tokens, bag, generator=g)


def reference(packed, codes, indices, weights):
    """Dequantize every row (float64), then the weighted bag in float64."""
    values = dequantize_rows(packed, codes).double()
    return (values[indices.long()] * weights.double()[..., None]).sum(1)


def bag_tolerance(out_dtype, weights, packed, codes, indices):
    """float32 accumulation of bag terms of magnitude |w| |v| plus one rounding to out_dtype."""
    values = dequantize_rows(packed, codes).double()
    magnitude = (values[indices.long()].abs() * weights.double().abs()[..., None]).sum(1)
    rounding = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[out_dtype]
    return magnitude * (indices.shape[1] + 2) * 2**-24 * 2 + rounding * magnitude + 1e-30


@pytest.mark.parametrize("codes", CODES)
@pytest.mark.parametrize("dim", DIMS)
def test_bag_matches_dequantized_reference(codes, dim):
    packed = quantize_rows(table(300, dim, seed=dim), codes)
    for index_dtype in (torch.int64, torch.int32):
        idx, w = lookups(300, 37, 19, seed=dim, index_dtype=index_dtype)
        out = ops.quantized_embedding_bag(packed, idx, w, codes)
        assert out.shape == (37, dim) and out.dtype == torch.float32
        ref = reference(packed, codes, idx, w)
        assert ((out.double() - ref).abs() <= bag_tolerance(torch.float32, w, packed, codes, idx)).all()


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("codes", CODES)
def test_out_dtypes_round_the_float32_sum_once(codes, out_dtype):
    packed = quantize_rows(table(200, 64), codes)
    idx, w = lookups(200, 50, 32)
    out32 = ops.quantized_embedding_bag(packed, idx, w, codes, torch.float32)
    out = ops.quantized_embedding_bag(packed, idx, w, codes, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, out32.to(out_dtype))


@pytest.mark.parametrize("codes", CODES)
def test_bag_sizes_zero_one_and_odd(codes):
    packed = quantize_rows(table(50, 48), codes)
    for bag in (0, 1, 3, 17):
        idx, w = lookups(50, 9, bag)
        out = ops.quantized_embedding_bag(packed, idx, w, codes)
        if bag == 0:
            assert torch.equal(out, torch.zeros(9, 48))
        else:
            torch.testing.assert_close(out.double(), reference(packed, codes, idx, w), rtol=1e-5, atol=1e-5)
    assert ops.quantized_embedding_bag(packed, *lookups(50, 0, 4), codes).shape == (0, 48)


def test_uint8_round_trip_error_is_half_a_step():
    t = table(500, 96)
    packed = quantize_rows(t, "uint8")
    back = dequantize_rows(packed, "uint8")
    step = (t.amax(1) - t.amin(1)) / 255
    # half a step, plus float32 rounding of code * scale + bias
    assert ((back - t).abs() <= step[:, None] * 0.5 + t.abs().amax(1, keepdim=True) * 2**-21).all()
    assert torch.equal(back.amin(1), t.amin(1))  # the row's minimum is the bias, exactly


def test_e4m3_round_trip_error_is_one_sixteenth():
    t = table(500, 96)
    back = dequantize_rows(quantize_rows(t, "float8_e4m3fn"), "float8_e4m3fn")
    scale = t.abs().amax(1, keepdim=True) / 448
    # relative 2^-4 for normal codes, or half e4m3's smallest step (2^-10 * scale) below 2^-6
    assert ((back - t).abs() <= torch.maximum(t.abs() * 2**-4, scale * 2**-10) * (1 + 2**-20)).all()


def test_constant_and_zero_rows():
    t = torch.zeros(4, 20)
    t[1] = 3.25
    t[2] = -7.0
    t[3, 5] = 1.0
    for codes in CODES:
        packed = quantize_rows(t, codes)
        back = dequantize_rows(packed, codes)
        assert torch.isfinite(back).all()
        torch.testing.assert_close(back, t, rtol=0, atol=1 / 255 if codes == "uint8" else 0)
        out = ops.quantized_embedding_bag(packed, torch.tensor([[0, 1, 2]]), torch.tensor([[1.0, 2.0, 0.5]]), codes)
        torch.testing.assert_close(out, (t[1] * 2 + t[2] * 0.5)[None], rtol=0, atol=1e-6)


def test_every_e4m3_code_decodes_as_torch_does():
    # all 256 codes (NaN ones included) in one row; scale 1 so the bag is the decoded code
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    packed = torch.cat([codes, torch.tensor([1.0]).view(torch.uint8)])[None]
    out = ops.quantized_embedding_bag(packed, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), "float8_e4m3fn")
    expected = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(out[0].isnan(), expected.isnan()) and expected.isnan().sum() == 2
    finite = ~expected.isnan()
    assert torch.equal(out[0][finite], expected[finite])
    assert torch.equal(torch.signbit(out[0][finite]), torch.signbit(expected[finite]))  # -0 stays -0


def test_reads_torch_byte_prepacked_tables():
    # the same layout as torch's (FBGEMM's) byte row-wise format: its packed table, our kernel
    t = table(64, 40)
    packed = torch.ops.quantized.embedding_bag_byte_prepack(t)
    assert packed.shape == (64, 48)
    idx, w = lookups(64, 11, 7)
    out = ops.quantized_embedding_bag(packed, idx, w, "uint8")
    theirs = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        packed, idx.reshape(-1), torch.arange(0, 77, 7), mode=0, per_sample_weights=w.reshape(-1),
        include_last_offset=False,
    )
    torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), reference(packed, "uint8", idx, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("codes", CODES)
def test_deterministic_across_runs_and_threads(codes):
    packed = quantize_rows(table(4096, 128), codes)
    idx, w = lookups(4096, 300, 32)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 1, 3):
            torch.set_num_threads(threads)
            outs.append(ops.quantized_embedding_bag(packed, idx, w, codes))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_quantize_is_deterministic_and_chunk_independent(monkeypatch):
    import memory_ext.nn.quantized as q

    t = table(1000, 24)
    whole = quantize_rows(t, "uint8")
    monkeypatch.setattr(q, "_CHUNK_ROWS", 7)
    assert torch.equal(quantize_rows(t, "uint8"), whole)
    assert torch.equal(quantize_rows(t.double(), "uint8"), whole)  # float64 tables are read as float32


@pytest.mark.parametrize("codes", CODES)
def test_opcheck(codes):
    packed = quantize_rows(table(40, 24), codes)
    idx, w = lookups(40, 6, 5)
    torch.library.opcheck(
        torch.ops.memory.quantized_embedding_bag.default, (packed, idx, w, codes, torch.float32),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"),
    )


def test_compiles_without_graph_breaks():
    packed = quantize_rows(table(40, 24), "uint8")
    idx, w = lookups(40, 6, 5)
    f = torch.compile(lambda p, i, x: ops.quantized_embedding_bag(p, i, x, "uint8") * 2, fullgraph=True, backend="eager")
    assert torch.equal(f(packed, idx, w), ops.quantized_embedding_bag(packed, idx, w, "uint8") * 2)


def test_forward_only():
    packed = quantize_rows(table(40, 24), "uint8")
    idx, w = lookups(40, 6, 5)
    w.requires_grad_(True)
    out = ops.quantized_embedding_bag(packed, idx, w, "uint8")  # a forward under grad mode works
    with pytest.raises(RuntimeError, match="memory.quantized_embedding_bag: forward only"):
        out.sum().backward()


def test_index_out_of_range():
    packed = quantize_rows(table(10, 8), "uint8")
    idx = torch.zeros(3, 2, dtype=torch.long)
    idx[2, 1] = 10
    with pytest.raises(RuntimeError, match=r"memory.quantized_embedding_bag: index out of range: indices\[2, 1\] = 10"):
        ops.quantized_embedding_bag(packed, idx, torch.ones(3, 2), "uint8")


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: quantize_rows(torch.randn(4, 3), "int4"), 'quantize_rows: codes must be "uint8" or "float8_e4m3fn"'),
        (lambda: quantize_rows(torch.randn(4), "uint8"), "quantize_rows: table must be a 2-D float tensor"),
        (lambda: quantize_rows(torch.ones(4, 3, dtype=torch.int32)), "quantize_rows: table must be a 2-D float"),
        (lambda: quantize_rows(torch.tensor([[1.0, 2.0], [0.0, float("inf")]])), "non-finite value .* in row 1"),
        (lambda: dequantize_rows(torch.zeros(3, 5, dtype=torch.uint8), "uint8"), r"dequantize_rows: packed must be"),
        (lambda: QuantizedMemoryValues(torch.zeros(3, 8, dtype=torch.uint8)), "QuantizedMemoryValues: packed must"),
        (lambda: QuantizedMemoryValues(torch.zeros(3, 9, dtype=torch.uint8), out_dtype=torch.float64), "out_dtype"),
        (lambda: quantize_values(torch.nn.Linear(2, 2)), "quantize_values: Linear holds no ProductKeyMemory"),
    ],
)
def test_python_side_rejects(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_module_replaces_values_in_a_layer_and_round_trips():
    torch.manual_seed(0)
    layer = ProductKeyMemory(32, n_keys=8, heads=2, k=4, swilu=True)
    x = torch.randn(5, 7, 32)
    with torch.no_grad():
        expected_table = layer.values.weight.clone()
        (q,) = quantize_values(layer)
        assert isinstance(layer.values, QuantizedMemoryValues) and layer.values is q
        assert "values.packed" in layer.state_dict() and "values.weight" not in layer.state_dict()
        y = layer(x)
        # the same layer with the dequantized table as a float table gives the same output
        ref = ProductKeyMemory(32, n_keys=8, heads=2, k=4, swilu=True)
        ref.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("values.")}, strict=False)
        ref.values.weight.copy_(q.dequantize())
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        assert (q.dequantize() - expected_table).abs().max() < (expected_table.max() - expected_table.min()) / 255
        # state_dict round trip into a freshly quantized layer: the same bits
        fresh = ProductKeyMemory(32, n_keys=8, heads=2, k=4, swilu=True)
        quantize_values(fresh)
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh.values.packed, q.packed) and torch.equal(fresh(x), y)


def test_format_mismatch_on_load_is_refused():
    a = QuantizedMemoryValues.from_values(MemoryValues(16, 8), "uint8")
    b = QuantizedMemoryValues.from_values(MemoryValues(16, 8), "float8_e4m3fn")
    with pytest.raises((ValueError, RuntimeError), match="holds uint8 rows of dim 8"):
        b.load_state_dict(a.state_dict())


def test_shared_pool_stays_shared_and_saves_through_torch_save(tmp_path):
    torch.manual_seed(1)
    cfg = DecoderConfig(vocab_size=50, dim=32, n_layers=3, n_heads=2, max_seq_len=16, memory_layers=(1, 2),
                        memory=dict(n_keys=8, heads=2, k=4))
    model = Decoder(cfg).eval()
    tokens = torch.randint(0, 50, (2, 10))
    tables = quantize_values(model, "uint8")
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    assert len(layers) == 2 and len(tables) == 1 and all(m.values is tables[0] for m in layers)
    with torch.no_grad():
        logits = model(tokens)
    torch.save(model.state_dict(), tmp_path / "q.pt")
    again = Decoder(cfg).eval()
    quantize_values(again, "uint8")
    again.load_state_dict(torch.load(tmp_path / "q.pt"))
    with torch.no_grad():
        assert torch.equal(again(tokens), logits)
