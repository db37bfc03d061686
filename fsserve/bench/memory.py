"""Memory figures of ``fsserve bench``: what loading a backend cost, and the peak growth during a call.

Resident memory (psutil) on the CPU, split into anonymous and file-backed pages on Linux so that
mmap-loaded weights count; the CUDA caching allocator's peak on a GPU.
"""

from __future__ import annotations


def rss_mb() -> float:
    """Resident memory of this process in MiB (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _resident_parts() -> tuple[float, float]:
    """Anonymous and file-backed resident MiB (Linux), or (RSS, 0) elsewhere."""
    parts = {}
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(("RssAnon:", "RssFile:")):
                    parts[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    if len(parts) < 2:
        return rss_mb(), 0.0
    return parts["RssAnon"], parts["RssFile"]


class LoadMemory:
    """What loading something adds to resident memory: anonymous and file-backed growth, each counted only if it grew.

    Under memory pressure the kernel drops clean file-backed pages (mmap-ed weights) while a session
    allocates, so a plain RSS difference can read near zero; counting the two kinds apart does not.
    """

    def __enter__(self) -> LoadMemory:
        self._anon, self._file = _resident_parts()
        self.mb = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        anon, file = _resident_parts()
        self.mb = max(anon - self._anon, 0.0) + max(file - self._file, 0.0)


class PeakMemory:
    """Peak memory of one call above what was resident before it: Linux's VmHWM (reset per call), or CUDA's peak.

    >>> probe = PeakMemory("cpu")
    >>> import numpy as np
    >>> probe.start(); _ = np.ones(1 << 22); probe.stop() >= 0
    True
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._before = 0.0
        self._can_reset = not self.cuda and self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        """Reset the kernel's high-water mark of resident memory (``echo 5 > /proc/self/clear_refs``)."""
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm_mb() -> float:
        """The high-water mark of resident memory since the last reset, in MiB."""
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return rss_mb()

    def start(self) -> None:
        """Remember the memory in use now and reset the peak."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated() / 2**20
        else:
            self._before = rss_mb()
            if self._can_reset:
                self._reset_hwm()

    def stop(self) -> float:
        """The peak above the memory in use at ``start`` (MiB; 0 when the call reused memory it already held)."""
        if self.cuda:
            import torch

            return max(0.0, torch.cuda.max_memory_allocated() / 2**20 - self._before)
        peak = self._hwm_mb() if self._can_reset else rss_mb()
        return max(0.0, peak - self._before)
