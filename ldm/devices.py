"""Devices and dtypes by name: "auto", "cuda:1", "fp16", ... -> torch objects, with errors that say what to pass;
and how much memory a device has free."""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """"fp32" | "fp16" | "bf16" (or torch's names, or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def pick_device(name: str = "auto") -> torch.device:
    """The device `name` asks for; "auto" is CUDA when available, else Apple's MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cuda, cuda:N, cpu, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for CUDA but no CUDA device is available; use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype `name` asks for; "auto" is fp16 on GPUs (CUDA, MPS) and fp32 on the CPU."""
    if name != "auto":
        return parse_dtype(name)
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: the free memory of a CUDA device (with the cache torch
    holds unused), the memory the system has available for the CPU; None where it cannot be known
    (MPS, unknown systems)."""
    if device.type == "cuda":  # what the driver has free, plus what torch's allocator holds unused
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def peak_memory(device: torch.device) -> int | None:
    """Bytes at the peak so far: of tensors on a CUDA device (`max_memory_allocated`), of this
    process's resident memory for the CPU (VmHWM: everything, weights and Python alike); None
    where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu":
        return None
    return _proc_bytes("/proc/self/status", "VmHWM")


def _proc_bytes(path: str, field: str) -> int | None:
    """A `field:  N kB` line of a Linux /proc file, in bytes (None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
