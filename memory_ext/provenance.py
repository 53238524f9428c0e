"""Where a result came from: machine, versions and source commit, saved next to every
benchmark and demo result."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

import memory_ext

__all__ = ["machine_info", "recorded_options"]


def machine_info(device: str) -> dict:
    """Date, platform, versions, threads, CPU model, cores, device (GPU name) and commit."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "memory_ext": memory_ext.__version__,
        "cuda_kernels_built": memory_ext.cuda_kernels_built(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "device": device,
        "commit": _commit(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def recorded_options(args) -> dict:
    """A run's command-line options as saved with its results: all but the output folder,
    which says where this machine wrote them, not how they were made."""
    return {k: v for k, v in vars(args).items() if k != "out"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"
