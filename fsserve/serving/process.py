"""``fsserve serve`` in a child process, as a user runs it: the port the OS picked, read from its announcement.

Benchmarks and the study's served-path check drive the real server this way, so the clients' Python
never shares the server's interpreter and nothing races for a port.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence


class ServerProcess:
    """Start ``fsserve serve ARGS`` (give ``--port 0``), wait for its "serving ... on HOST:PORT" line; stop with SIGTERM (it drains).

    >>> with ServerProcess(["bundles/sst2", "--port", "0", "--metrics-port", "-1"]) as server:  # doctest: +SKIP
    ...     server.port
    """

    def __init__(self, serve_args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300.0) -> None:
        command = [sys.executable, "-m", "fsserve", "serve", *serve_args]
        self.http_port: int | None = None  # set when the arguments ask for --http-port
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(env) if env is not None else None)
        self.port = self._wait_for_port(timeout)

    def _wait_for_port(self, timeout: float) -> int:
        """Read the server's announcement line and return its gRPC port (and note its HTTP one)."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            seen.append(line.rstrip())
            match = re.search(r"serving .*? on [\d.]+:(\d+)", line)
            http = re.search(r"HTTP/REST on [\d.]+:(\d+)", line)
            if http:
                self.http_port = int(http.group(1))
            if match:
                threading.Thread(target=self.process.stdout.read, daemon=True).start()  # keep the pipe drained
                return int(match.group(1))
        self.stop()
        raise RuntimeError("the server did not start:\n" + "\n".join(seen[-20:]))

    def stop(self) -> None:
        """SIGTERM, wait for the drain, kill only if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
