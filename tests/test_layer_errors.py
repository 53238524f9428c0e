"""Every layer rejects a wrong input width, dtype or device with a message naming the layer and
the problem; the checks leave torch.compile (fullgraph) and autocast working."""
import re

import pytest
import torch

from memory_ext import ProductKeyMemory
from memory_ext.model import Decoder, DecoderConfig, memory_placement


def pkm():
    torch.manual_seed(0)
    return ProductKeyMemory(16, n_keys=8, heads=2, k=4)


def decoder(memory=True):
    cfg = DecoderConfig(vocab_size=50, dim=32, n_layers=3, n_heads=2, max_seq_len=16)
    if memory:
        cfg.memory_layers = memory_placement(3, 1)
        cfg.memory = dict(n_keys=8, heads=2, k=4)
    torch.manual_seed(0)
    return Decoder(cfg)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(3, 15), "input must have last dimension 16 (the layer's dim), got shape (3, 15)"),
        (torch.randn(2, 4, 17), "input must have last dimension 16 (the layer's dim), got shape (2, 4, 17)"),
        (torch.tensor(1.0), "input must have last dimension 16 (the layer's dim), got shape ()"),
        (torch.randint(0, 5, (3, 16)), "input must be a floating-point tensor, got dtype torch.int64"),
        (torch.zeros(3, 16, dtype=torch.bool), "input must be a floating-point tensor, got dtype torch.bool"),
        (torch.randn(3, 16, device="meta"), "input is on meta but the layer's parameters are on cpu"),
    ],
)
def test_product_key_memory_rejects(x, match):
    layer = pkm()
    with pytest.raises(ValueError, match="^" + re.escape("ProductKeyMemory: " + match) + "$"):
        layer(x)
    with pytest.raises(ValueError, match=re.escape("ProductKeyMemory: " + match)):
        layer.lookup(x)


def test_product_key_memory_lookup_wants_2d():
    with pytest.raises(ValueError, match=re.escape("ProductKeyMemory.lookup: input must be 2-D (tokens, dim), got shape (2, 3, 16)")):
        pkm().lookup(torch.randn(2, 3, 16))


@pytest.mark.parametrize(
    "tokens,match",
    [
        (torch.randint(0, 50, (16,)), "tokens must be 2-D (batch, seq), got shape (16,)"),
        (torch.randint(0, 50, (2, 3, 4)), "tokens must be 2-D (batch, seq), got shape (2, 3, 4)"),
        (torch.randn(2, 8), "tokens must be int64 or int32 token ids, got dtype torch.float32"),
        (torch.randint(0, 50, (2, 8), dtype=torch.int16), "tokens must be int64 or int32 token ids, got dtype torch.int16"),
        (torch.randint(0, 50, (2, 8), device="meta"), "tokens are on meta but the model's parameters are on cpu"),
        (torch.zeros(1, 17, dtype=torch.long), "sequence length 17 exceeds max_seq_len 16"),
        (torch.tensor([[1, 2, 50]]), "token ids must be in [0, vocab_size = 50), got ids from 1 to 50"),
        (torch.tensor([[-1, 2, 3]], dtype=torch.int32), "token ids must be in [0, vocab_size = 50), got ids from -1 to 3"),
    ],
)
def test_decoder_rejects(tokens, match):
    with pytest.raises(ValueError, match="^" + re.escape("Decoder: " + match) + "$"):
        decoder()(tokens)


def test_decoder_accepts_int32_and_empty_batches():
    model = decoder()
    tokens = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(model(tokens.int()), model(tokens))
    assert model(torch.zeros(0, 8, dtype=torch.long)).shape == (0, 8, 50)


def test_checks_leave_torch_compile_fullgraph_working():
    model = decoder()
    tokens = torch.randint(0, 50, (2, 12))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens), model(tokens))
    # A new dtype recompiles and the check still runs; fullgraph reports it as its own
    # exception, quoting the message.
    with pytest.raises(Exception, match="Decoder: tokens must be int64 or int32"):  # noqa: B017
        compiled(tokens.float())
    layer = pkm()
    x = torch.randn(5, 16)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


def test_checks_leave_autocast_working():
    model = decoder()
    tokens = torch.randint(0, 50, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model(tokens), atol=0.1, rtol=0.1)
