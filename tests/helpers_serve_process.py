"""Run `prefixcap serve` in a child process, for end-to-end tests and `benchmarks/bench_serve.py`.

A real process on a real socket is what users run; it also keeps the server's memory and CPU
apart from the client's, so RSS and throughput measurements are about the server alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

_SERVING = re.compile(r"serving .* at (http://\S+?)/ ")  # the line `prefixcap serve` prints when ready


@contextmanager
def serve_in_subprocess(
    model: str | Path,
    *serve_args: str,
    log_path: str | Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `prefixcap serve --model MODEL --port 0 SERVE_ARGS...` with `env` added to this
    process's environment, wait until /health says it is ready, and yield (process, base URL).
    Its output goes to `log_path`; it is stopped on exit."""
    command = [sys.executable, "-m", "prefixcap", "serve", "--model", str(model), "--port", "0", *serve_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        url = _wait_until_ready(process, Path(log_path), timeout)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_ready(process: subprocess.Popen, log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefixcap serve exited with status {process.returncode}:\n{log_path.read_text()}")
        found = _SERVING.search(log_path.read_text())
        if found and _healthy(found.group(1)):
            return found.group(1)
        time.sleep(0.2)
    raise TimeoutError(f"prefixcap serve was not ready after {timeout:.0f}s:\n{log_path.read_text()}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:  # listening, but uvicorn has not started accepting yet
        return False
