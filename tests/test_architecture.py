"""The code's shape stays as ARCHITECTURE.md and STYLE.md describe it."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "curvopt"


def _code_lines(source: str, node: ast.AST) -> int:
  """Lines of code of a function: no docstrings (its own or nested), blanks or comments."""
  lines = set(range(node.lineno, node.end_lineno + 1))
  for sub in ast.walk(node):
    body = getattr(sub, "body", None)
    if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and body:
      first = body[0]
      if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        if isinstance(first.value.value, str):
          lines -= set(range(first.lineno, first.end_lineno + 1))
  text = source.splitlines()
  return sum(1 for i in lines if text[i - 1].strip() and not text[i - 1].strip().startswith("#"))


def _functions(package: str):
  for path in sorted((ROOT / package).rglob("*.py")):
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        yield f"{path.relative_to(ROOT.parent)}:{node.name}", _code_lines(source, node)


@pytest.mark.parametrize("package", ["optimizers", "linalg"])
def test_no_function_in_the_optimisers_and_linear_algebra_is_longer_than_80_lines(package):
  long = {name: n for name, n in _functions(package) if n > 80}
  assert not long, long


def test_the_line_counter_counts_code_only():
  source = 'def f(x):\n  """Doc.\n\n  More.\n  """\n  # a comment\n\n  y = x\n  return y\n'
  assert _code_lines(source, ast.parse(source).body[0]) == 3
