"""Value tables in safetensors files, memory-mapped: bitwise lookups, nothing read at open
(resident pages measured), copy-on-write training that never touches the file, models whose
pool is a file, bad files; and the CUDA host-table view (its CUDA cases skip without a GPU)."""
import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import memory_ext
from memory_ext import MemoryValues, ProductKeyMemory
from memory_ext.model import Decoder, DecoderConfig
from memory_ext.nn import (
    cuda_host_values,
    cuda_host_view,
    load_pool_,
    load_values,
    read_values_header,
    save_values,
    value_optimizer,
    write_values_file,
)

from conftest import CUDA_SKIP, requires_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def mapping_stats(t: torch.Tensor) -> dict:
    """Rss and Private_Dirty bytes of the mapping (VMA) holding t's first byte, from /proc/self/smaps."""
    addr, stats, inside = t.data_ptr(), {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and all(c in "0123456789abcdef-" for c in head[0]):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                if inside:
                    break
                inside = lo <= addr < hi
                if inside:
                    stats["size"] = hi - lo
            elif inside and head[0] in ("Rss:", "Private_Dirty:"):
                stats[head[0][:-1]] = int(head[1]) * 1024
    assert inside, "no mapping holds the tensor"
    return stats


def pmd_bytes() -> int:
    """The largest folio the page cache may map at once (the PMD size; 2 MiB on x86-64)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except OSError:
        return 2 << 20


def file_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def random_inputs(n_rows: int, tokens: int, bag: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_rows, (tokens, bag), generator=g), torch.rand(tokens, bag, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_mapped_lookups_equal_in_memory_bitwise(tmp_path, dtype):
    torch.manual_seed(0)
    values = MemoryValues(1000, 48, dtype=dtype)
    path = tmp_path / "values.safetensors"
    values.save_file(path)
    mapped = MemoryValues.from_file(path)
    assert isinstance(mapped, MemoryValues) and (mapped.n_rows, mapped.dim) == (1000, 48)
    assert mapped.weight.dtype == dtype and mapped.weight.device.type == "cpu"
    assert mapped.weight.data_ptr() % 4096 == 0  # the rows start on a page, as save_values writes them
    assert torch.equal(mapped.weight, values.weight)
    indices, weights = random_inputs(1000, 37, 19)
    weights = weights.requires_grad_()
    out = mapped(indices, weights)
    assert torch.equal(out, values(indices, weights))
    grad_out = torch.randn_like(out)
    (g_mapped,) = torch.autograd.grad(out, weights, grad_out)
    (g_memory,) = torch.autograd.grad(values(indices, weights), weights, grad_out)
    assert torch.equal(g_mapped, g_memory)
    copied = load_values(path, mmap=False)  # read in full into fresh memory
    assert torch.equal(copied(indices, weights), out)


@linux_only
def test_open_reads_nothing_and_lookups_read_only_their_pages(tmp_path):
    n_rows, dim = 65536, 256  # 64 MiB of float32 rows, 1 KiB each
    path = tmp_path / "big.safetensors"
    g = torch.Generator().manual_seed(3)
    write_values_file(path, n_rows, dim, torch.float32, (torch.randn(4096, dim, generator=g) for _ in range(16)))
    mapped = load_values(path)
    nbytes = n_rows * dim * 4
    assert mapping_stats(mapped.weight)["size"] >= nbytes
    assert mapping_stats(mapped.weight)["Rss"] == 0  # opening touched no row
    indices, weights = random_inputs(n_rows, 4, 2, seed=4)
    mapped(indices, weights)
    rss = mapping_stats(mapped.weight)["Rss"]
    # 8 rows read: each maps the page-cache folio holding it and, with the kernel's
    # fault-around, at most 64 KiB around it. A folio is one 4 KiB page on older kernels;
    # newer ones (ext4 on Linux 6.1x) cache a freshly written file in large folios of up to
    # a PMD (2 MiB). Either way far from the whole table.
    folio = max(64 << 10, pmd_bytes())
    assert 0 < rss <= 8 * folio and rss < nbytes // 4, rss
    float(mapped.weight.detach().sum())  # a full read: the measurement sees it
    assert mapping_stats(mapped.weight)["Rss"] >= nbytes


@linux_only
def test_open_leaves_the_page_cache_cold(tmp_path):
    """With the file's pages dropped from the page cache, opening brings back the header only."""
    import ctypes
    import mmap

    path = tmp_path / "cold.safetensors"
    save_values(torch.randn(8192, 256), path)  # 8 MiB
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)

    def cached_pages() -> int:
        with open(path, "rb") as f:
            probe = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        anchor = ctypes.c_char.from_buffer(probe)
        vec = (ctypes.c_ubyte * ((size + 4095) // 4096))()
        assert libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0
        del anchor
        probe.close()
        return sum(b & 1 for b in vec)

    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached_pages() > 0:
            pytest.skip("this file system keeps the pages cached after POSIX_FADV_DONTNEED (tmpfs?)")
        mapped = load_values(path)
        assert cached_pages() <= 2  # the header page (read with read(2)), nothing of the rows
        mapped(*random_inputs(8192, 1, 1))
        assert 1 <= cached_pages() <= 3
    finally:
        os.close(fd)


def test_training_a_mapped_table_is_copy_on_write(tmp_path):
    torch.manual_seed(1)
    n_keys, dim = 128, 128  # 16384 rows of 512 bytes: 8 rows per page
    layer_mem = ProductKeyMemory(64, n_keys=n_keys, heads=2, k=8, values=MemoryValues(n_keys**2, dim))
    path = tmp_path / "pool.safetensors"
    save_values(layer_mem.values, path)
    digest = file_digest(path)
    layer_file = ProductKeyMemory(64, n_keys=n_keys, heads=2, k=8, values=MemoryValues.from_file(path))
    layer_file.load_state_dict({k: v for k, v in layer_mem.state_dict().items() if k != "values.weight"}, strict=False)
    opts = [value_optimizer(layer, 1e-2) for layer in (layer_mem, layer_file)]
    x = torch.randn(3, 16, 64)
    read = set()
    for _ in range(3):
        for layer, opt in zip((layer_mem, layer_file), opts, strict=True):
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
        read |= set(layer_mem.lookup(x.reshape(-1, 64))[0].unique().tolist())
    assert torch.equal(layer_file.values.weight, layer_mem.values.weight)  # trained bitwise alike
    assert not torch.equal(layer_file.values.weight, load_values(path).weight)  # and trained
    assert file_digest(path) == digest  # the file never changed
    if sys.platform.startswith("linux"):
        dirty = mapping_stats(layer_file.values.weight)["Private_Dirty"]
        # Only pages of updated rows were copied (at most one page per row read).
        assert 0 < dirty <= len(read) * 4096 + 4096 and dirty < n_keys**2 * dim * 4 // 2, (dirty, len(read))
    # Saving over the mapped file replaces it; the live mapping keeps reading its own pages.
    before = layer_file.values.weight.clone()
    layer_file.values.save_file(path)
    assert torch.equal(layer_file.values.weight, before)
    assert torch.equal(load_values(path).weight, before)


def tiny_decoder(pool: MemoryValues | None = None) -> Decoder:
    torch.manual_seed(5)
    memory = dict(n_keys=16, heads=2, k=4) if pool is None else dict(n_keys=16, heads=2, k=4, values=pool)
    return Decoder(DecoderConfig(vocab_size=40, dim=32, n_layers=4, n_heads=2, max_seq_len=24,
                                 memory_layers=(1, 3), memory=memory))


def test_decoder_with_a_file_backed_pool_matches_bitwise(tmp_path):
    model = tiny_decoder()
    pool = next(m for m in model.modules() if isinstance(m, MemoryValues))
    path = tmp_path / "decoder_pool.safetensors"
    save_values(pool, path)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(6))
    expected = model(tokens)
    expected_text = model.generate(tokens[:, :4], 8)

    # A model already built: its one pool is pointed at the file (every sharing layer reads it).
    other = tiny_decoder()
    with torch.no_grad():
        next(m for m in other.modules() if isinstance(m, MemoryValues)).weight.zero_()
    mapped_pool = load_pool_(other, path)
    memories = [m for m in other.modules() if isinstance(m, ProductKeyMemory)]
    assert len(memories) == 2 and all(m.values is mapped_pool for m in memories)
    assert torch.equal(other(tokens), expected)
    assert torch.equal(other.generate(tokens[:, :4], 8), expected_text)

    # Built around the mapped pool, so the table is never allocated: the model's other
    # weights come from the state dict without the pool's keys.
    built = tiny_decoder(MemoryValues.from_file(path))
    rest = {k: v for k, v in model.state_dict().items() if not k.endswith("values.weight")}
    missing, unexpected = built.load_state_dict(rest, strict=False)
    assert all(k.endswith("values.weight") for k in missing) and not unexpected
    assert torch.equal(built(tokens), expected)

    # mmap=False copies into the existing weight (the same Parameter: optimizers stay valid).
    third = tiny_decoder()
    third_pool = next(m for m in third.modules() if isinstance(m, MemoryValues))
    weight = third_pool.weight
    with torch.no_grad():
        weight.zero_()
    assert load_pool_(third_pool, path, mmap=False).weight is weight
    assert torch.equal(third(tokens), expected)


def test_reads_files_of_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(2)
    table = torch.randn(50, 12).bfloat16()
    path = tmp_path / "lib.safetensors"
    st.save_file({"model.pool.weight": table, "other": torch.arange(3, dtype=torch.int8)}, str(path),
                 metadata={"note": "written by safetensors"})
    mapped = load_values(path, key="model.pool.weight")
    assert torch.equal(mapped.weight, table)
    ours = tmp_path / "ours.safetensors"
    save_values(table, ours)
    assert torch.equal(st.load_file(str(ours))["weight"], table)  # and the library reads ours


def write_raw(path, header: dict, data: bytes) -> None:
    """A safetensors-shaped file with this header (padded so the data starts 8-byte aligned) and data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_bad_files_are_refused_clearly(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(FileNotFoundError, match="MemoryValues.from_file: no value-table file at"):
        MemoryValues.from_file(tmp_path / "missing.safetensors")
    path.write_bytes(b"\x03\x00")
    with pytest.raises(ValueError, match="not a safetensors file .*no header length"):
        load_values(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file .*header length"):
        load_values(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(ValueError, match="not a safetensors file .*not JSON"):
        load_values(path)
    write_raw(path, {"embed": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(ValueError, match="not a value table: it holds no tensor 'weight' .*'embed'"):
        load_values(path)
    write_raw(path, {"weight": {"dtype": "I8", "shape": [4, 4], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(ValueError, match="a dtype value tables do not use, 'I8'; value tables are F32, BF16"):
        load_values(path)
    write_raw(path, {"weight": {"dtype": "Q4_K", "shape": [4, 4], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(ValueError, match="an unknown dtype, 'Q4_K'"):
        read_values_header(path)
    write_raw(path, {"weight": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, bytes(64))
    with pytest.raises(ValueError, match=r"not a value table: tensor 'weight' has shape \[16\]"):
        load_values(path)
    write_raw(path, {"weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}, bytes(60))
    with pytest.raises(ValueError, match="do not match its shape"):
        load_values(path)
    write_raw(path, {"weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(40))
    with pytest.raises(ValueError, match="is truncated: tensor 'weight' ends at byte"):
        load_values(path)
    write_raw(path, {"weight": "nonsense"}, b"")
    with pytest.raises(ValueError, match="malformed entry for 'weight'"):
        load_values(path)


def test_misaligned_table_is_refused(tmp_path):
    path = tmp_path / "misaligned.safetensors"
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    header += b" " * ((-len(header) % 4) + 1)  # 8 + len is then 1 mod 4: the floats start off their alignment
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(ValueError, match="not a multiple of its 4-byte elements"):
        load_values(path)


def test_pool_and_device_mismatches_are_refused(tmp_path):
    path = tmp_path / "pool.safetensors"
    save_values(MemoryValues(64, 8), path)
    with pytest.raises(ValueError, match=r"load_pool_: .* holds a \(64, 8\) table but the pool is \(64, 16\)"):
        load_pool_(MemoryValues(64, 16), path)
    with pytest.raises(ValueError, match="holds torch.float32 rows but the pool is torch.bfloat16"):
        load_pool_(MemoryValues(64, 8, dtype=torch.bfloat16), path)
    with pytest.raises(ValueError, match="exactly one value pool, got Linear with 0"):
        load_pool_(torch.nn.Linear(2, 2), path)
    two = torch.nn.ModuleList([MemoryValues(64, 8), MemoryValues(64, 8)])
    with pytest.raises(ValueError, match="exactly one value pool, got ModuleList with 2"):
        load_pool_(two, path)
    with pytest.raises(ValueError, match="mmap=True maps the file into CPU memory, got device='meta'"):
        load_values(path, device="meta")
    with pytest.raises(ValueError, match="chunks hold 3 rows, n_rows is 4"):
        write_values_file(tmp_path / "short.safetensors", 4, 8, torch.float32, [torch.zeros(3, 8)])
    assert not (tmp_path / "short.safetensors").exists()  # nothing half-written is left
    with pytest.raises(ValueError, match="value tables are float32, bfloat16, float16 or float64, got torch.int8"):
        write_values_file(tmp_path / "x.safetensors", 4, 8, torch.int8, [])
    with pytest.raises(ValueError, match="expected a MemoryValues or a 2-D"):
        save_values(torch.zeros(3), tmp_path / "x.safetensors")
    on_meta = MemoryValues(64, 8, device="meta")
    with pytest.raises(ValueError, match="pool is on the meta device"):
        load_pool_(on_meta, path, mmap=False)
    assert load_pool_(on_meta, path).weight.device.type == "cpu"  # mapped: a meta-built pool gets the file's rows


def test_benchmark_quick_run_writes_complete_json(tmp_path):
    out = tmp_path / "file_values.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_file_values.py"), "--quick",
                          "--out", str(out), "--dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["machine"]["commit"]
    tables = {r["table"] for r in report["results"]}
    assert tables == {"file cold", "file warm", "in memory"}, tables
    assert all(0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["gbs"] > 0 for r in report["results"])
    assert report["bitwise_equal"] is True
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".safetensors")]  # the table file was deleted


# ---------------------------------------------------------------------------------------
# CUDA: a host table read by the GPU.


@pytest.mark.skipif(CUDA_SKIP is None, reason="checks the error raised without CUDA")
def test_host_view_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="cuda_host_view: CUDA is not available"):
        cuda_host_view(torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="cuda_host_view: CUDA is not available"):
        cuda_host_values(MemoryValues(16, 4))


def test_host_view_bad_input():
    with pytest.raises(ValueError, match="cuda_host_view: expected a CPU tensor"):
        cuda_host_view([1, 2])
    with pytest.raises(ValueError, match="must be contiguous"):
        cuda_host_view(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="device must be a CUDA device"):
        cuda_host_view(torch.zeros(4, 4), device="cpu")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_view_gathers_bitwise_like_a_device_table(dtype):
    torch.manual_seed(7)
    table = torch.randn(4099, 96).to(dtype)  # an odd row count; 16-byte rows at bfloat16
    before = torch.cuda.memory_allocated()
    view = cuda_host_view(table)
    assert view.is_cuda and view.dtype == dtype and view.shape == table.shape
    assert view.data_ptr() == table.data_ptr()  # unified addressing: the host rows, no copy
    assert torch.cuda.memory_allocated() == before
    indices, weights = random_inputs(4099, 64, 32)
    indices, weights = indices.cuda(), weights.cuda()
    expected = memory_ext.embedding_bag(table.cuda(), indices, weights)
    del table  # the view keeps the host rows alive
    assert torch.equal(memory_ext.embedding_bag(view, indices, weights), expected)


@requires_cuda
def test_model_serving_from_a_host_pool_matches_the_device_pool(tmp_path):
    model = tiny_decoder()
    path = tmp_path / "pool.safetensors"
    save_values(next(m for m in model.modules() if isinstance(m, MemoryValues)), path)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(6))
    expected = model.cuda()(tokens.cuda())
    served = tiny_decoder()
    load_pool_(served, path, mmap=False)
    pool = cuda_host_values(served)
    served.cuda()
    assert pool.weight.is_cuda and pool.weight.device.type == "cuda"
    assert torch.equal(served(tokens.cuda()), expected)
