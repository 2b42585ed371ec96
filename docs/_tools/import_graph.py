"""The import graph of curvopt's packages, read from the source (``ast``), for the docs.

Each module's ``import curvopt...`` / ``from curvopt... import ...`` statements (at any depth:
imports inside functions count) are mapped to the package they reach: ``autodiff``,
``curvature``, ``linalg``, ``optimizers``, ``privacy``, ``recipes``, ``launcher``,
``sharding``, or ``shared`` (the private ``_typing``, ``_checks``, ``_nnx``). ``from curvopt
import name`` is mapped to the package that defines ``name`` (read from
``curvopt/__init__.py``). Imports inside a package are not edges.

Run ``python docs/_tools/import_graph.py`` to print the Markdown table that
``docs/architecture.md`` and ``ARCHITECTURE.md`` hold between their ``import-graph`` markers,
or ``--write`` to update both (``tests/test_architecture.py`` checks that they match the code
and that every import goes in an allowed direction).
"""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "curvopt"
PAGE = ROOT / "docs" / "architecture.md"
#: The pages that hold the generated table between the markers.
PAGES = (PAGE, ROOT / "ARCHITECTURE.md")
BEGIN, END = "<!-- import-graph: begin -->", "<!-- import-graph: end -->"
#: Packages from the bottom of the stack up (the order of the table).
ORDER = (
  "shared",
  "autodiff",
  "curvature",
  "linalg",
  "optimizers",
  "privacy",
  "recipes",
  "sharding",
  "launcher",
)


def package_of(module: str) -> str | None:
  """``curvopt.linalg.cg`` -> ``linalg``; ``curvopt._typing`` -> ``shared``; else ``None``."""
  parts = module.split(".")
  if parts[0] != "curvopt" or len(parts) == 1:
    return None
  if parts[1] in ("_typing", "_checks", "_nnx"):
    return "shared"
  return parts[1] if parts[1] in ORDER else None


def _reexports() -> dict[str, str]:
  """``name -> package`` for every ``from curvopt.<...> import name`` in ``__init__.py``."""
  names = {}
  for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("curvopt"):
      for alias in node.names:
        target = package_of(f"{node.module}.{alias.name}") or package_of(node.module)
        names[alias.asname or alias.name] = target
  return names


def _imported(node: ast.AST, reexports: dict[str, str]) -> set[str]:
  if isinstance(node, ast.Import):
    return {package_of(alias.name) for alias in node.names} - {None}
  if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    if node.module == "curvopt":
      return {reexports.get(a.name) or package_of(f"curvopt.{a.name}") for a in node.names} - {None}
    return {package_of(f"{node.module}.{a.name}") or package_of(node.module) for a in node.names}
  return set()


def import_graph() -> dict[str, set[str]]:
  """``package -> set of curvopt packages it imports`` (excluding itself)."""
  reexports = _reexports()
  graph = {name: set() for name in ORDER}
  for path in sorted(PACKAGE.rglob("*.py")):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    source = package_of(module.removesuffix(".__init__"))
    if source is None:  # curvopt/__init__.py re-exports everything; it is not a layer
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      graph[source] |= _imported(node, reexports) - {source, None}
  return graph


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
  """Each package's level: 0 if it imports nothing, else 1 + the highest level it imports."""
  memo: dict[str, int] = {}

  def level(name: str, seen: tuple[str, ...] = ()) -> int:
    if name in seen:
      raise ValueError(f"import cycle: {' -> '.join((*seen, name))}")
    if name not in memo:
      memo[name] = 1 + max((level(d, (*seen, name)) for d in graph[name]), default=-1)
    return memo[name]

  return {name: level(name) for name in graph}


def table(graph: dict[str, set[str]]) -> str:
  """The graph as a drawing of its levels and a Markdown table of its edges, top level first."""
  level = levels(graph)
  drawing = ["```text"]
  for lv in range(max(level.values()), -1, -1):
    drawing.append(f"level {lv}   " + " · ".join(n for n in ORDER if level[n] == lv))
    drawing += ["            ↓"] if lv else []
  drawing.append("```")
  rows = ["\n".join(drawing), "", "| level | package | imports (inside curvopt) |", "|---|---|---|"]
  for name in sorted(ORDER, key=lambda n: (-level[n], ORDER.index(n))):
    deps = ", ".join(f"`{d}`" for d in ORDER if d in graph[name]) or "nothing"
    rows.append(f"| {level[name]} | `{name}` | {deps} |")
  return "\n".join(rows)


def page_table(text: str) -> str:
  """The table between the markers of ``docs/architecture.md``."""
  return text.split(BEGIN)[1].split(END)[0].strip()


def main(argv: list[str]) -> None:
  generated = table(import_graph())
  if "--write" in argv:
    for page in PAGES:
      text = page.read_text()
      head, rest = text.split(BEGIN)
      page.write_text(f"{head}{BEGIN}\n{generated}\n{END}{rest.split(END)[1]}")
  else:
    print(generated)


if __name__ == "__main__":
  main(sys.argv[1:])
