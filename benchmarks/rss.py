"""Resident-memory measurement shared by the benchmarks (Linux /proc).

A benchmark child resets the kernel's high-water mark right before the work and reads it
after; ``ru_maxrss`` cannot be reset and is inherited across fork, so it is only the
fallback where /proc/self/clear_refs is not writable.
"""

from __future__ import annotations

import resource


def proc_status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_kib(resettable: bool) -> int:
    """The high-water mark since the reset, or ``ru_maxrss`` (whole process) without one."""
    if resettable:
        return proc_status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
