"""Whether a sweep fits the memory it runs in, decided on every rank before the first row.

A rank holds the out-of-place buffers of one size at a time (send + recv: at most twice
the swept size), the backend's temporaries and a chunk of validation scratch
(:mod:`flagcx.bench.data`). Measured peaks per rank on the 2-core VM, 2 ranks, float
allreduce: 2.0x the swept size for flagcx and gloo, 2.6x for MPI, at 256 MiB and 1 GiB
(``benchmarks/results/2026-12-06_bench_memory_and_noise.md``). The estimate is
``BUFFER_FACTOR`` x the largest size per rank, plus ``RUNTIME_BYTES`` on the host for
the interpreter, torch and the libraries.
"""

from __future__ import annotations

from typing import Optional

import torch

BUFFER_FACTOR = 3
"""Peak bytes per rank / largest swept size (measured 2.0 to 2.6, see the module docstring)."""

RUNTIME_BYTES = 256 << 20
"""A rank's resident size before the first buffer (measured 232 MiB with torch 2.13 on CPU)."""


def host_available() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _human(nbytes: float) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    return f"{int(nbytes)}"


def _largest_power_of_two(nbytes: float) -> int:
    return 1 << max(int(nbytes).bit_length() - 1, 0) if nbytes >= 1 else 0


def problem(max_bytes: int, local_ranks: int, device: torch.device) -> Optional[str]:
    """Why a sweep up to ``max_bytes`` cannot fit this host (or this rank's GPU), or None when it fits."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = BUFFER_FACTOR * max_bytes
        if need <= free:
            return None
        fits = _largest_power_of_two(free / BUFFER_FACTOR)
        return (
            f"-e {_human(max_bytes)} needs about {_human(need)} on each GPU ({BUFFER_FACTOR} x the largest buffer) but "
            f"{device} has {_human(free)} free; lower -e to {_human(fits)} or less"
        )
    available = host_available()
    if available is None:
        return None
    per_rank = BUFFER_FACTOR * max_bytes + RUNTIME_BYTES
    need = local_ranks * per_rank
    if need <= available:
        return None
    fits = _largest_power_of_two((available / local_ranks - RUNTIME_BYTES) / BUFFER_FACTOR)
    advice = f"lower -e to {_human(fits)} or less, or run fewer ranks per host" if fits else "run fewer ranks per host"
    return (
        f"-e {_human(max_bytes)} with {local_ranks} rank(s) on this host needs about {_human(need)} of memory "
        f"({BUFFER_FACTOR} x the largest buffer + {_human(RUNTIME_BYTES)} per rank) but {_human(available)} is available; {advice}"
    )
