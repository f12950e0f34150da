"""Helpers shared by the benchmark scripts: thread setup, machine description, CPU peak-memory probes.

CPU peak memory is read from the kernel, since torch's CPU allocator keeps no peak statistics:
``reset_peak_rss()`` writes "5" to /proc/self/clear_refs, which resets the process' resident-set
high-water mark (VmHWM) to its current RSS; ``peak_rss_bytes()`` then reads VmHWM. A benchmark takes
``rss_bytes()`` as its baseline right after the reset, so "peak - baseline" is what the measured code
added on top of what the process already held. Where clear_refs is not writable we fall back to
``ru_maxrss`` (the lifetime peak), which can only over-state the baseline and under-state the delta;
``peak_is_resettable()`` says which one is in use.
"""

from __future__ import annotations

import os
import platform
import re
import resource
from pathlib import Path

GB = 1e9


def setup_threads(threads: int) -> None:
    """Pin torch's intra-op pool (and Faiss' OpenMP pool, when Faiss is installed) to ``threads``."""
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def _proc_kb(path: str, field: str) -> int | None:
    """``field`` of a /proc file that reports sizes in kB (e.g. /proc/self/status), in bytes."""
    try:
        with open(path) as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _status_kb(field: str) -> int | None:
    return _proc_kb("/proc/self/status", field)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    rss = _status_kb("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_PEAK_RESET_WORKS: bool | None = None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS. Returns False where unsupported."""
    global _PEAK_RESET_WORKS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _PEAK_RESET_WORKS = _status_kb("VmHWM") is not None
    except OSError:
        _PEAK_RESET_WORKS = False
    return _PEAK_RESET_WORKS


def peak_is_resettable() -> bool:
    return bool(_PEAK_RESET_WORKS)


def peak_rss_bytes() -> int:
    """Peak RSS since the last successful ``reset_peak_rss()`` (else since process start)."""
    if _PEAK_RESET_WORKS:
        hwm = _status_kb("VmHWM")
        if hwm is not None:
            return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def mem_available_bytes() -> int | None:
    return _proc_kb("/proc/meminfo", "MemAvailable")


def load_average() -> float:
    """1-minute load average (how many runnable tasks competed for the cores)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache cpu0 sees (sysfs), e.g. 32 MiB on the EPYC hosts, 480 MiB on a Xeon one.

    Benchmarks size their layer chains from it (a chain that fits the cache times the cache, not memory);
    None where sysfs does not say."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", size)
        if kind != "Instruction" and match:
            sizes.append(int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)])
    return max(sizes, default=None)


def machine_description(device: str = "cpu") -> str:
    import torch

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    parts = [
        f"{platform.machine()} {cpu_model()}",
        f"{os.cpu_count()} cores",
        f"last-level cache {llc / 2**20:.0f} MiB" if (llc := last_level_cache_bytes()) else "cache size unknown",
        f"{total:.0f} GB RAM",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"load avg {load_average():.2f}",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name(torch.device(device)))
    return ", ".join(parts)
