"""Resident-memory probes shared by the CPU benchmarks (Linux /proc): the current and peak resident set, and a
reset of the peak mark so one process can measure several phases."""

from __future__ import annotations


def rss_kb(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
