"""What the compiler made of the CPU gathers, read from the built library's machine code.

Some of what makes the gathers fast leaves no trace in their results: a row prefetch the
compiler drops, or byte codes widened through a chain of shuffles, change only the time.
These tests read the disassembly (binutils' objdump; skipped without it or off x86-64)."""
import platform
import re
import shutil
import subprocess
from functools import cache

import pytest

from memory_ext import _C

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None,
    reason="reads x86-64 machine code with objdump")


@cache
def functions(pattern: str) -> dict[str, str]:
    """Demangled name -> disassembly of every function of the library whose name matches
    (its code: not the ifunc resolvers that pick a variant, nor PLT stubs)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True,
                          text=True, check=True).stdout
    found, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
            if not re.search(pattern, name) or name.endswith("@plt") or ".resolver]" in name:
                name = None
            else:
                found[name] = ""
        elif name is not None:
            found[name] += line + "\n"
    return found


def test_every_bag_sum_keeps_its_row_prefetches():
    # The far prefetch into L2 (prefetcht1) and the near one into L1 (prefetcht0), in every
    # instruction set's variant of every chunk width and row type.
    sums = functions(r"memory_ext::cpu::bag_sum_(in_registers|codes_v4|bf16_v4)<")
    assert len(sums) >= 20, sorted(sums)
    for name, code in sums.items():
        assert "prefetcht1" in code and "prefetcht0" in code, f"{name} lost its prefetches"


def test_avx512_uint8_codes_are_widened_by_zero_extending_loads():
    variants = functions(r"memory_ext::cpu::bag_sum_codes_v4<\d+, unsigned char>")
    if not variants:
        pytest.skip("the AVX-512 variant is built by GCC on x86-64 only")
    for name, code in variants.items():
        assert "vpmovzxbd" in code and "vextracti" not in code, name


def test_avx512_bf16_rows_are_widened_by_masks_and_shifts():
    variants = functions(r"memory_ext::cpu::bag_sum_bf16_v4<")
    if not variants:
        pytest.skip("the AVX-512 variant is built by GCC on x86-64 only")
    for name, code in variants.items():  # no per-16-codes zero extension (vpmovzxwd) left
        assert "vpandd" in code and "vpslld" in code and "vpmovzxwd" not in code, name


def test_avx512_fp16_rows_are_widened_by_vcvtph2ps():
    variants = functions(r"memory_ext::cpu::(bag_sum_codes_v4<\d+, memory_ext::cpu::half_bits>|row_axpy_n_half_v4<|"
                         r"row_dot_half_v4)")
    if not variants:
        pytest.skip("the AVX-512 variants are built by GCC on x86-64 only")
    for kind in ("bag_sum_codes_v4", "row_axpy_n_half_v4", "row_dot_half_v4"):
        assert any(kind in name for name in variants), (kind, sorted(variants))
    for name, code in variants.items():
        assert "vcvtph2ps" in code, name
