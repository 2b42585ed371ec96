"""Every Python code block of the README and of docs/ runs, and the pages say what the code does.

A page's ```` ```python ```` blocks run in order in one namespace, as a reader would paste them
into one session, in JAX's default float32 mode (as users' code runs) and in a temporary
working directory. A block whose fence reads ```` ```python fragment ```` is an excerpt that
cannot run alone (it names the reader's own data or model); it is highlighted like any Python
block and skipped here. Keep those few: a block that can run should.
"""

import ast
import contextlib
import importlib.util
import inspect
import os
import pathlib
import re

import jax
import pytest

import curvopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
FRAGMENT = "python fragment"


def pages() -> list[pathlib.Path]:
  found = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
  return [p for p in found if "_build" not in p.parts]


def code_blocks(text: str) -> list[tuple[int, str, str]]:
  """``(line, info, source)`` of each top-level fenced block (1-based line of the fence)."""
  blocks, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    match = FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    fence, indent, start = match["fence"], len(match["indent"]), i
    body = []
    i += 1
    while i < len(lines) and not lines[i].strip().startswith(fence):
      body.append(lines[i][indent:])
      i += 1
    blocks.append((start + 1, match["info"].strip(), "\n".join(body) + "\n"))
    i += 1
  return blocks


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
  """The blocks of ``path`` that run: ``python`` blocks that are not fragments."""
  return [(line, src) for line, info, src in code_blocks(path.read_text()) if info == "python"]


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


RUNNABLE = [p for p in pages() if python_blocks(p)]


@contextlib.contextmanager
def _user_mode(tmp_path: pathlib.Path):
  """JAX's defaults (float32), a scratch working directory, and a non-interactive backend."""
  previous_x64, previous_cwd = jax.config.jax_enable_x64, os.getcwd()
  jax.config.update("jax_enable_x64", False)
  os.environ.setdefault("MPLBACKEND", "Agg")
  os.chdir(tmp_path)
  try:
    yield
  finally:
    os.chdir(previous_cwd)
    jax.config.update("jax_enable_x64", previous_x64)


@pytest.mark.long
@pytest.mark.parametrize("path", RUNNABLE, ids=_name)
def test_code_blocks_run(path, tmp_path):
  namespace = {"__name__": f"docs_{path.stem}"}
  with _user_mode(tmp_path):
    for line, source in python_blocks(path):
      code = compile(source, f"{_name(path)}:{line}", "exec")
      try:
        exec(code, namespace)  # noqa: S102 (the documentation's own code)
      except Exception as error:
        raise AssertionError(f"the block at {_name(path)}:{line} failed: {error!r}") from error


def test_blocks_are_python_or_marked_fragments_and_parse():
  """Every Python block at least parses; the fence info is one of the two conventions."""
  for path in pages():
    for line, info, source in code_blocks(path.read_text()):
      if info.startswith("python"):
        assert info in ("python", FRAGMENT), f"{_name(path)}:{line}: fence '{info}'"
        ast.parse(source, f"{_name(path)}:{line}")


def test_code_blocks_parser_finds_fences_and_fragments():
  text = "x\n```python\na = 1\n```\n\n  ```python fragment\n  b\n  ```\n```bash\nls\n```\n"
  assert code_blocks(text) == [(2, "python", "a = 1\n"), (6, FRAGMENT, "b\n"), (9, "bash", "ls\n")]


def test_readme_is_short_and_gives_the_two_commands_ci_runs():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 250
  venv = "python3 -m venv .venv && . .venv/bin/activate && pip install -e "
  main = venv + '".[experiments]" && python experiments/run.py configs/quickstart.yaml'
  tests = venv + '".[test]" && python -m pytest -q'
  blocks = [src.strip() for _, info, src in code_blocks(readme) if info == "bash"]
  assert main in blocks and tests in blocks
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert 'pip install -q -e ".[test]"' in ci and "python -m pytest -q" in ci
  # ... and then the long tier, which the README's command leaves out (pyproject's addopts).
  assert ci.index("python -m pytest -q -m long") == ci.index("python -m pytest -q") + 1


def test_every_public_name_is_in_the_api_reference():
  api = (DOCS / "api" / "index.md").read_text()
  listed = set(re.findall(r"^ {3}(\w+)$", api, re.M)) | set(re.findall(r"`curvopt\.(\w+)`", api))
  missing = [name for name in curvopt.__all__ if name not in listed]
  assert not missing, f"add to docs/api/index.md: {missing}"
  pages_ = {p.stem for p in (DOCS / "api").glob("*.md")}
  packages = [n for n in curvopt.__all__ if inspect.ismodule(getattr(curvopt, n))]
  for name in packages:
    module = getattr(curvopt, name).__name__
    assert module.split(".")[1] in pages_, module


def test_architecture_page_shows_the_imports_of_the_code():
  spec = importlib.util.spec_from_file_location("import_graph", DOCS / "_tools" / "import_graph.py")
  graph = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(graph)
  page = graph.page_table((DOCS / "architecture.md").read_text())
  assert page == graph.table(graph.import_graph()), (
    "docs/architecture.md is out of date: run python docs/_tools/import_graph.py --write"
  )
