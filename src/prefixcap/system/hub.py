"""The Hugging Face hub when it cannot be reached: one quick check, then offline at once.

huggingface_hub retries a refused or timed-out connection five times with back-off, for each file
a loader asks for, so an unreachable hub used to cost minutes and a screen of retry lines before
transformers' own error. Before prefixcap loads a name that is not a local path, `hub_problem`
sends one request to the endpoint (HF_ENDPOINT) through huggingface_hub's own HTTP client, so the
same proxies and certificates apply; when that fails, it switches huggingface_hub to offline mode
for the rest of the process and its children. Cached files then load at once, and `missing_from_hub`
says why a name that is not cached cannot be loaded, for a one-line error.
"""

from __future__ import annotations

import os
from pathlib import Path

PROBE_TIMEOUT = 5.0  # seconds for the one request that decides whether the hub can be reached
_unreachable: list[str] = []  # why the probe failed, once it has


def hub_problem() -> str | None:
    """Why the hub cannot be used now ("HF_HUB_OFFLINE is set", "the hub at URL cannot be reached:
    REASON"), or None when it can. Probes the endpoint on the first call (see the module
    docstring); later calls reuse the answer."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _unreachable:
        return _unreachable[0]
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)
    except Exception as error:  # the client's connection, TLS and timeout errors differ between versions
        reason = " ".join(str(error).split()) or type(error).__name__
        _unreachable.append(f"the hub at {constants.ENDPOINT} cannot be reached: {reason}")
        constants.HF_HUB_OFFLINE = True  # read on every request by huggingface_hub and transformers
        os.environ["HF_HUB_OFFLINE"] = "1"  # and by the processes this one starts
        return _unreachable[0]
    return None  # any HTTP answer, even an error status, means the hub is there


def missing_from_hub(name: str | Path) -> str | None:
    """Why `name` cannot be loaded, when it is not a local path, the hub cannot be used and the
    cache does not hold it, in words for "cannot load NAME (...)"; None otherwise (then loading
    it may go ahead: from the hub, from the cache, or from the local path)."""
    if Path(name).exists():
        return None
    problem = hub_problem()
    if problem is None or _in_cache(str(name)):
        return None
    return f"not a local folder, nor in the Hugging Face cache, and {problem}"


def _in_cache(repo_id: str) -> bool:
    """Whether the hub cache holds the model repo `repo_id` (its config.json: every model has one)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id ("../x", "a/b/c"): then it is in no cache
        return False
