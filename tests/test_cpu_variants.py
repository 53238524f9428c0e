"""The AVX-512 variants of the CPU row loops (csrc/cpu/row_dispatch.h) against the portable
clones they stand in for: every output bit for bit, on a grid of row types, dims (register
chunks, rows side by side, tails), bags and thread counts. The clones run in a subprocess
with MEMORY_EXT_NO_AVX512_VARIANTS set (read once per process)."""
import os
import subprocess
import sys

import pytest
import torch

from memory_ext import ops
from memory_ext.nn import quantize_rows

# Dims: 16-128 and 256-512 take chunks in registers, 40 / 100 / 1000 rows side by side (with
# tails), 48 and 24 short rows with a tail of 16-lane vectors.
DIMS = (16, 24, 40, 48, 64, 100, 128, 256, 512, 1000)
BAGS = (1, 5, 128)


def outputs() -> list[torch.Tensor]:
    """Every op whose CPU kernel goes through row_dispatch.h, over the grid; the thread
    count is left as it was."""
    threads_before = torch.get_num_threads()
    try:
        return grid_outputs()
    finally:
        torch.set_num_threads(threads_before)


def grid_outputs() -> list[torch.Tensor]:
    torch.manual_seed(0)
    outs = []
    for dim in DIMS:
        for bag in BAGS:
            # Enough sums of many rows that a product fused the other way round shows in
            # 16-bit outputs too (about one element in 300 at bag 128).
            idx = torch.randint(0, 400, (64, bag))
            w = torch.randn(64, bag)
            table = torch.randn(400, dim)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                t, g = table.to(dtype), torch.randn(64, dim).to(dtype)
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    outs.append(ops.embedding_bag(t, idx, w))
                    outs.extend(ops.embedding_bag_backward(g, t, idx, w, True))
            for codes in ("uint8", "float8_e4m3fn"):
                outs.append(ops.quantized_embedding_bag(quantize_rows(table, codes), idx, w, codes))
    outs.extend(half_special_outputs())
    return outs


def half_special_outputs() -> list[torch.Tensor]:
    """The fp16 backward's rounding at its edges: NaN codes with payloads (either sign),
    infinities, sums that overflow, round half to even and land on subnormals; one lookup
    per row, so the rows go through the batched kernel as well as the single-row tail."""
    dim, tokens = 64, 61
    idx = torch.randperm(400)[:tokens].view(tokens, 1)
    w = torch.tensor([1.0, -1.0, 3.0e4, 1.0e-5, 0.5, 2.0 ** -20]).repeat(tokens)[:tokens].view(tokens, 1)
    g = torch.randn(tokens, dim).to(torch.float16)
    codes = g.view(torch.int16)
    codes[:, 0] = 0x7C01  # a signalling NaN with payload 1
    codes[:, 1] = 0xFE55 - 0x10000  # a quiet NaN, negative, payload 0x55 (as int16)
    codes[:, 2] = 0x7C00  # +inf
    codes[:, 3] = 0x3C01  # 1 + 2^-10: halves and ties under the weights above
    codes[:, 4] = 0x0001  # the smallest subnormal
    table = torch.randn(400, dim).to(torch.float16)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        _, rows_grad, _ = ops.embedding_bag_backward(g, table, idx, w, True)
        outs.append(rows_grad)
    return outs


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.is_floating_point() else t


@pytest.mark.skipif(sys.platform != "linux", reason="the variants are built for x86-64 Linux (GCC)")
def test_variants_and_clones_give_the_same_bits(tmp_path):
    path = tmp_path / "clones.pt"
    env = {**os.environ, "MEMORY_EXT_NO_AVX512_VARIANTS": "1"}
    code = f"import sys, torch; sys.path.insert(0, {os.path.dirname(__file__)!r}); " \
           f"import test_cpu_variants as t; torch.save(t.outputs(), {str(path)!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    clones, variants = torch.load(path), outputs()
    assert len(clones) == len(variants)
    for k, (c, v) in enumerate(zip(clones, variants, strict=True)):
        assert c.dtype == v.dtype and c.shape == v.shape, k
        assert torch.equal(bits(c), bits(v)), f"output {k} ({v.dtype}, {tuple(v.shape)}) differs"
