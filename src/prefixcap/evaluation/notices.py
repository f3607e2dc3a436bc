"""One-line notices on stderr, and a way to keep chatty Java tools from flooding the terminal."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


def notice(message: str) -> None:
    """Tell the user, in one line, about something that changes what gets reported."""
    print(f"note: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Send stdout and stderr, of this process and its children, to a buffer instead of the terminal.

    pycocoevalcap's Java tools write progress lines and, when they fail, Java stack traces. The
    yielded list receives the captured lines on exit, so a caller can quote the one that matters.
    """
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            lines.extend(line for line in sink.read().decode(errors="replace").splitlines() if line.strip())
