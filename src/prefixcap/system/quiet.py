"""transformers' progress bars and load reports, silenced while prefixcap loads a model.

Its loaders draw a "Loading weights" bar per component and log a report of unused weights (a full
CLIP's text tower, when only the image tower is wanted): noise to a prefixcap user, since prefixcap
checks what matters itself (`model.hf_loading.load_checked`) and says it in one line. The CLI
silences transformers for the whole process; a Python program keeps its own settings, which
`quiet_transformers` restores afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Errors only, and no progress bars, from transformers inside the block."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
