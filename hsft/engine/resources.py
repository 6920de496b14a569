"""What a piece of work cost: wall time, peak host memory and peak accelerator memory.

The host peak is the process's resident-set high-water mark (VmHWM). On Linux it is reset at the
start of each measurement (writing 5 to /proc/self/clear_refs), so every stage of one process gets
its own peak instead of the largest since the process began; where the reset is not allowed the
peak is the process's so far, and the record says so. The accelerator peak is torch's
max_memory_allocated (tensors only: the caching allocator's reserve is not counted).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Usage", "measure", "host_peak_bytes", "reset_host_peak", "disk_bytes"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
GiB = 2**30


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def host_peak_bytes() -> int | None:
    """The resident-set high-water mark of this process since start or the last reset (None off Linux)."""
    return _status_bytes("VmHWM")


def reset_host_peak() -> bool:
    """Reset the high-water mark to the current resident set; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def disk_bytes(path: Path) -> int:
    """Bytes of the regular files below `path` (symbolic links not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass
class Usage:
    seconds: float = 0.0
    peak_host_gib: float | None = None
    host_peak_reset: bool = False  # False: the host peak is the process's since it started
    peak_gpu_gib: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def measure(device: torch.device | None = None):
    """Yield a Usage that is filled in when the block ends (also when it raises)."""
    usage = Usage(host_peak_reset=reset_host_peak())
    cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield usage
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            usage.peak_gpu_gib = torch.cuda.max_memory_allocated(device) / GiB
        usage.seconds = time.perf_counter() - start
        peak = host_peak_bytes()
        usage.peak_host_gib = None if peak is None else peak / GiB
