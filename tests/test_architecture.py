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


# ------------------------------------------------------------------- import directions

_LOWER = {"shared", "autodiff", "curvature", "linalg"}
ALLOWED = {
  "shared": set(),
  "autodiff": {"shared"},
  "curvature": {"shared", "autodiff"},
  "linalg": {"shared", "autodiff"},
  "sharding": {"shared"},
  "optimizers": _LOWER,
  "privacy": _LOWER | {"optimizers"},
  "recipes": _LOWER | {"optimizers", "privacy"},
  "launcher": _LOWER | {"optimizers", "privacy", "recipes", "sharding"},
}


def _graph_tool():
  import importlib.util

  path = ROOT.parent / "docs" / "_tools" / "import_graph.py"
  spec = importlib.util.spec_from_file_location("import_graph", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_import_goes_in_an_allowed_direction():
  graph = _graph_tool().import_graph()
  assert set(graph) == set(ALLOWED), set(graph) ^ set(ALLOWED)
  wrong = {package: deps - ALLOWED[package] for package, deps in graph.items()}
  assert not any(wrong.values()), {p: d for p, d in wrong.items() if d}


def test_architecture_md_draws_the_imports_of_the_code():
  tool = _graph_tool()
  text = (ROOT.parent / "ARCHITECTURE.md").read_text()
  assert tool.page_table(text) == tool.table(tool.import_graph()), (
    "ARCHITECTURE.md is out of date: run python docs/_tools/import_graph.py --write"
  )


def test_the_direction_test_would_catch_an_upward_import(tmp_path, monkeypatch):
  tool = _graph_tool()
  fake = tmp_path / "curvopt"
  for package in ALLOWED:
    if package != "shared":
      (fake / package).mkdir(parents=True)
      (fake / package / "__init__.py").write_text("")
  (fake / "__init__.py").write_text("")
  (fake / "linalg" / "bad.py").write_text("from curvopt.optimizers import newton_cg\n")
  monkeypatch.setattr(tool, "PACKAGE", fake)
  monkeypatch.setattr(tool, "ROOT", tmp_path)
  graph = tool.import_graph()
  assert "optimizers" in graph["linalg"] and "optimizers" not in ALLOWED["linalg"]
