"""Claim files that let several worker processes share one experiment's cells without computing one twice.

A worker claims a cell by creating ``<cell>.lock`` with ``O_CREAT | O_EXCL`` (atomic on a local or
NFS-v3+ file system), writes its pid and host into it, and deletes it when the cell's JSON is written.
Another worker that finds the lock waits for the JSON, or takes the cell over when the holder is gone:
a lock whose process no longer exists on this host, or whose pid now names a process started after
the claim (the pid was reused), is stale (its worker was killed). A lock held from
another host is taken as live, since its pid cannot be checked from here.

Two workers that find the same stale lock at the same moment may both compute that cell; the result
files are written atomically and equal, so the cost is time, never a corrupt cache.

>>> import tempfile, pathlib
>>> lock = pathlib.Path(tempfile.mkdtemp()) / "cell.lock"
>>> try_claim(lock), try_claim(lock)  # the second claim finds this process's own live lock
(True, False)
>>> release(lock); lock.exists()
False
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

UNREADABLE_GRACE_S = 60.0  # a lock still empty after this long belongs to a worker that died mid-claim


def holder_alive(lock: Path) -> bool:
    """Whether the worker that wrote ``lock`` may still be running (so its cell must not be taken over)."""
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        pid, host = int(info["pid"]), str(info["host"])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        try:  # being written right now, or left empty by a crash
            return time.time() - lock.stat().st_mtime < UNREADABLE_GRACE_S
        except FileNotFoundError:
            return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    started = process_start_time(pid)
    since = info.get("since")
    # A process younger than the claim only shares the dead holder's pid (reused): waiting on it would hang.
    return started is None or not isinstance(since, (int, float)) or started <= since + 2.0


def process_start_time(pid: int) -> float | None:
    """When a process started (Unix time) from Linux's /proc, or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, counted after "pid (comm)"
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def try_claim(lock: Path) -> bool:
    """Atomically claim a cell for this process; a stale lock (dead holder) is removed and claimed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if holder_alive(lock):
                return False
            logger.warning("taking over %s: its worker is gone", lock)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        return True
    return False


def release(lock: Path) -> None:
    """Drop this process's claim (the cell's result is written, or computing it failed)."""
    lock.unlink(missing_ok=True)
