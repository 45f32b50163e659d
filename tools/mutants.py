"""Flip one condition at a time in a module and run its tests: every flip should turn a
test red. Prints the flips no test noticed; a flip that makes the tests hang (past
FLIP_TIMEOUT_S) counts as noticed, and the run goes on. (A check of the tests, not part of
the suite; run it on an editable install, and on nothing else meanwhile: it edits the
module in place, and puts it back at the end.)

    python tools/mutants.py ai_agent_proxy/context.py tests/test_context.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FLIP_TIMEOUT_S = 60.0  # a flip whose tests run longer has made them hang: counted as caught

FLIPS = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE,
    ast.LtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip


class Flipper(ast.NodeTransformer):
    """Flips the `target`-th condition it meets (comparisons, and/or, if/while tests)."""

    def __init__(self, target: int) -> None:
        self.target, self.seen, self.what = target, -1, ""

    def _hit(self) -> bool:
        self.seen += 1
        return self.seen == self.target

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if type(node.ops[0]) in FLIPS and self._hit():
            self.what = f"line {node.lineno}: {ast.unparse(node)} (operator flipped)"
            node.ops[0] = FLIPS[type(node.ops[0])]()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        if self._hit():
            self.what = f"line {node.lineno}: {ast.unparse(node)} (and/or swapped)"
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return node

    def visit_If(self, node: ast.If) -> ast.AST:
        self.generic_visit(node)
        if self._hit():
            self.what = f"line {node.lineno}: if {ast.unparse(node.test)} (negated)"
            node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
        return node


def main() -> None:
    module, tests = Path(sys.argv[1]), sys.argv[2:]
    source = module.read_text()
    missed: list[str] = []
    hung: list[str] = []
    total = 0
    try:
        while True:
            flipper = Flipper(total)
            tree = flipper.visit(ast.parse(source))
            if not flipper.what:
                break
            module.write_text(ast.unparse(ast.fix_missing_locations(tree)))
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p",
                     "no:cacheprovider", *tests],
                    capture_output=True, timeout=FLIP_TIMEOUT_S,
                )  # fmt: skip
                if result.returncode == 0:
                    missed.append(flipper.what)
            except subprocess.TimeoutExpired:  # the flip made the tests hang: noticed
                hung.append(flipper.what)
            total += 1
    finally:
        module.write_text(source)
    print(f"{total - len(missed)} of {total} flips caught by {' '.join(tests)}"
          f" ({len(hung)} by a hang past {FLIP_TIMEOUT_S:.0f} s)")  # fmt: skip
    for what in missed:
        print("  not caught:", what)


if __name__ == "__main__":
    main()
