"""Text shown on a terminal. File names are data: one named with escape sequences must not clear
the screen, retitle the window or hide the line it is in, so every message naming a file goes
through `for_terminal`, and record output does when it goes to a terminal."""

from __future__ import annotations

import re
from typing import IO

# C0 controls but tab and newline, DEL, and the C1 controls (which some terminals also obey).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def for_terminal(text: str) -> str:
    """`text` with control characters written as `\\xNN`, and undecodable file-name bytes (surrogate
    escapes) as `\\udcNN`, so that it is valid UTF-8 that a terminal only displays."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROLS.sub(lambda match: f"\\x{ord(match[0]):02x}", text)


def is_terminal(stream: IO) -> bool:
    """Whether `stream` is a terminal (False for files, pipes and streams without a file number)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
