"""Registers, stack and local-memory accesses of every CUDA kernel in the built library,
read from its machine code: no GPU needed, only a cuobjdump (the CUDA toolkit's, or the
copy Triton ships in its NVIDIA backend).

Local-memory instructions (STL/LDL in the SASS) are register spills or arrays the
compiler could not keep in registers; either way they are traffic a kernel's inner loop
should not have. Each kernel is listed per architecture with its registers (REG), stack
frame bytes and counts of local stores and loads; the JSON has every kernel, the printed
table those with any local access.

    python bench/kernel_resources.py [--library memory_ext/_C*.so] [--out bench/out/kernel_resources.json]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, print_table, save_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["arch", "kernel", "registers", "stack_bytes", "local_stores", "local_loads"]


def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump (CUDA_HOME, PATH), else the one in Triton's NVIDIA backend."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return bundled if os.access(bundled, os.X_OK) else None
    except ImportError:
        return None


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=True)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """void memory_ext::cuda::(anonymous namespace)::kernel<T, ...>(Args) -> kernel<T, ...>."""
    name = demangled.replace("(anonymous namespace)::", "").removeprefix("void ")
    if name.endswith(")"):  # drop the parameter list: the parenthesis that closes at the end
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = name.replace("memory_ext::cuda::", "").replace("memory_ext_cub::", "")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "half")


def resource_usage(cuobjdump: str, library: str) -> dict[tuple[str, str], dict]:
    """(arch, mangled kernel) -> registers and stack bytes."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", library], capture_output=True, text=True,
                          check=True).stdout
    usage, arch, kernel = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            kernel = m.group(1)
        elif kernel and (m := re.search(r"REG:(\d+) STACK:(\d+)", line)):
            usage[(arch, kernel)] = {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))}
            kernel = None
    return usage


def local_accesses(cuobjdump: str, library: str) -> dict[tuple[str, str], dict]:
    """(arch, mangled kernel) -> counts of local-memory stores and loads in its SASS."""
    proc = subprocess.Popen([cuobjdump, "-sass", library], stdout=subprocess.PIPE, text=True)
    counts, arch, kernel = {}, None, None
    for line in proc.stdout:
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            kernel = (arch, m.group(1))
            counts[kernel] = {"local_stores": 0, "local_loads": 0}
        elif kernel and (m := re.search(r"\b(STL|LDL)(\.\S+)?\s", line)):
            counts[kernel]["local_stores" if m.group(1) == "STL" else "local_loads"] += 1
    if proc.wait() != 0:
        raise RuntimeError(f"{cuobjdump} -sass {library} failed")
    return counts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default=None, help="the extension's shared library (default: memory_ext/_C*.so)")
    p.add_argument("--out", default="bench/out/kernel_resources.json")
    args = p.parse_args(argv)
    library = args.library or next(iter(sorted(glob.glob(os.path.join(ROOT, "memory_ext", "_C*.so")))), None)
    if library is None:
        raise SystemExit("kernel_resources: no memory_ext/_C*.so: build the extension first")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise SystemExit("kernel_resources: no cuobjdump (CUDA toolkit or Triton's NVIDIA backend) found")
    usage = resource_usage(cuobjdump, library)
    if not usage:
        raise SystemExit(f"kernel_resources: {library} holds no CUDA kernels (a CPU-only build?)")
    local = local_accesses(cuobjdump, library)
    names = demangle(sorted({k for _, k in usage}))
    rows = [dict(arch=arch, kernel=short_name(names[k]), mangled=k, **u,
                 **local.get((arch, k), {"local_stores": None, "local_loads": None}))
            for (arch, k), u in sorted(usage.items())]
    with_local = [r for r in rows if r["local_stores"] or r["local_loads"]]
    summary = {arch: {"kernels": sum(r["arch"] == arch for r in rows),
                      "with_local_accesses": sum(r["arch"] == arch for r in with_local)}
               for arch in sorted({r["arch"] for r in rows})}
    print(f"{os.path.basename(library)}: " + "; ".join(
        f"{a}: {s['with_local_accesses']} of {s['kernels']} kernels access local memory" for a, s in summary.items()))
    if with_local:
        print_table(with_local, COLUMNS)
    report = dict(benchmark="kernel_resources", machine=machine_info("cpu"), cuobjdump=os.path.basename(cuobjdump),
                  summary=summary, kernels=rows)
    save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
