"""The shape of a source tree, for comparing two revisions: modules and lines per package (a root
module counts under "(root)") and the functions that take **kwargs.

    python benchmarks/code_shape.py src/prefixcap [--list]
    git worktree add /tmp/old c1877ce && python benchmarks/code_shape.py /tmp/old/src/prefixcap
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the package folder, e.g. src/prefixcap")
    parser.add_argument("--list", action="store_true", help="also list the functions that take **kwargs")
    args = parser.parse_args()
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    keyword_functions = []
    for path in sorted(args.root.rglob("*.py")):
        relative = path.relative_to(args.root)
        package = relative.parts[0] if len(relative.parts) > 1 else "(root)"
        text = path.read_text(encoding="utf-8")
        sizes[package][0] += 1
        sizes[package][1] += len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.args.kwarg:
                keyword_functions.append(f"{relative}:{node.name}")
    for package, (modules, lines) in sorted(sizes.items()):
        print(f"{package:<12} {modules:>3} modules {lines:>6} lines")
    modules, lines = (sum(values) for values in zip(*sizes.values()))
    print(f"total {modules} modules, {lines} lines; {len(keyword_functions)} functions take **kwargs")
    if args.list:
        print("\n".join(keyword_functions))


if __name__ == "__main__":
    main()
