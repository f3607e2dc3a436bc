"""How an image flows to a caption, package by package: runs `prefixcap caption --model DIR IMAGE`
in this process (once to warm imports, then traced) and counts the calls between prefixcap's
packages (a root module counts as its own package) and how many of them enter a package the flow
had already entered and left. Calls into the helper packages every layer uses (LEAVES) are not
counted. Run it on two revisions with the same model and image to compare their flows:

    python benchmarks/caption_flow.py MODEL_DIR IMAGE > flow.txt
"""

from __future__ import annotations

import sys

from prefixcap.cli import main

LEAVES = {"system", "options", "errors", "atomic", "extras", "hardware", "typecheck"}  # helpers every layer calls


def unit(module: str) -> str | None:
    parts = module.split(".")
    return None if parts[0] != "prefixcap" else (parts[1] if len(parts) > 1 else "prefixcap")


def trace(args: list[str]) -> list[tuple[str, str, str]]:
    calls: list[tuple[str, str, str]] = []

    def profile(frame, event, arg):
        if event != "call" or frame.f_code.co_name == "<module>":
            return
        callee = unit(frame.f_globals.get("__name__", ""))
        caller_frame = frame.f_back
        while caller_frame is not None and unit(caller_frame.f_globals.get("__name__", "")) is None:
            caller_frame = caller_frame.f_back  # through torch/transformers back to prefixcap's caller
        if callee is None or caller_frame is None:
            return
        caller = unit(caller_frame.f_globals["__name__"])
        if caller != callee and callee not in LEAVES:
            calls.append((caller, callee, f"{frame.f_globals['__name__']}.{frame.f_code.co_qualname}"))

    sys.setprofile(profile)
    try:
        main(args)
    finally:
        sys.setprofile(None)
    return calls


if __name__ == "__main__":
    args = ["caption", "--model", sys.argv[1], sys.argv[2]]
    main(args)
    calls = trace(args)
    entered: set[str] = set()
    reentries = 0
    for caller, callee, function in calls:
        again = callee in entered
        reentries += again
        entered.add(callee)
        print(f"{'re-enter ' if again else 'enter    '}{caller:>12} -> {callee:<12} {function}")
    print(
        f"{len(calls)} cross-package calls, {reentries} re-enter a package the flow had entered before, "
        f"{len(entered)} packages",
        file=sys.stderr,
    )
