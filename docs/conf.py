"""Sphinx configuration of curvopt's documentation site.

Build it as CI does (warnings are errors, every reference must resolve)::

  pip install -e ".[docs]"
  python -m sphinx -E -W --keep-going -n -b html docs docs/_build/html

The pages are Markdown (MyST); the API reference is generated from the Google-style docstrings
(napoleon), whose reST roles (:func:, :class:, :mod:) and ``.. math::`` blocks Sphinx renders
natively. No network is used at build time (no intersphinx): references to other libraries
(jax, optax, flax, numpy, ...) are left as text and exempted from the nitpicky check below.
"""

import importlib
import inspect

import curvopt

project = "curvopt"
author = "the curvopt authors"
copyright = "2026, the curvopt authors"
release = version = curvopt.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = True

# ------------------------------------------------------------------------------ pages (MyST)
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# --------------------------------------------------------------------------- API (autodoc)
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
add_module_names = False
python_display_short_literal_types = True

# Other libraries' names in signatures and docstrings: there is no network at build time, so they
# stay plain text. Everything of curvopt's own must resolve.
_EXTERNAL = (
  r"(jax|jaxlib|optax|numpy|np|jnp|flax|nnx|typing|typing_extensions|collections|enum|types|"
  r"dataclasses|omegaconf|dp_accounting|matplotlib|pathlib|os|abc|functools|warnings|"
  r"concurrent|contextlib|threading|signal|optimistix|scipy)(\..*)?"
)
nitpick_ignore_regex = [
  (r"py:.*", _EXTERNAL),
  # Type aliases of curvopt._typing and module-level aliases (Params = Any, ...), which
  # autodoc prints by name; they are not documented objects.
  (r"py:.*", r"(Params|Batch|LossFn|Matvec|PRNGKey|ArrayLike|Array|Shape|Dtype|PyTree|Key)"),
  # Literal option values in signatures ('fwd_rev', 'ggn', ...).
  (r"py:.*", r"'.*'|\".*\"|-?[0-9.e+-]+"),
]
# Private names in public signatures: not documented objects.
nitpick_ignore = [
  ("py:class", "curvopt.launcher.runner._Setup"),  # curvopt/launcher/runner.py signatures
]
nitpick_ignore_regex.append((r"py:.*", r"curvopt(\.\w+)*\._\w+(\.\w+)*"))

# ------------------------------------------------------------------------------ HTML (furo)
html_theme = "furo"
html_title = f"curvopt {release}"
html_static_path = []


# -------------------------------------------------------- re-exported names: curvopt.<name>
def _canonical(target: str, env) -> str | None:
  """``curvopt.hvp`` -> ``curvopt.curvature.products.hvp``: where a re-export is documented."""
  parts = target.split(".")
  if parts[0] != "curvopt":
    return None
  for i in range(len(parts) - 1, 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    try:
      for attr in parts[i:]:
        obj = getattr(obj, attr)
    except AttributeError:
      return None
    if inspect.ismodule(obj):
      name = obj.__name__
    elif hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
      name = f"{obj.__module__}.{obj.__qualname__}"
    else:  # data (a tuple, a constant): the documented module attribute that is this object
      name = _documented_data(parts[-1], obj, env)
    return None if name == target else name
  return None


def _documented_data(attr: str, obj, env) -> str | None:
  for name in env.get_domain("py").objects:
    module, _, last = name.rpartition(".")
    if last == attr and module.startswith("curvopt"):
      try:
        if getattr(importlib.import_module(module), attr) is obj:
          return name
      except ImportError:
        continue
  return None


def _resolve_reexport(app, env, node, contnode):
  """Resolves ``curvopt.<name>`` (a re-export), or a bare ``<name>`` that curvopt re-exports,
  to the module path where the object is documented.

  Docstrings are written for the ``curvopt.<name>`` namespace: ``:func:`dp_sgd``` in
  ``curvopt.privacy.clipping`` means ``curvopt.dp_sgd``, documented in
  ``curvopt.privacy.dp_sgd``.
  """
  if node.get("refdomain") != "py":
    return None
  target = node["reftarget"].lstrip("~.")
  candidates = [target] if target.startswith("curvopt.") else []
  if not target.startswith("curvopt."):
    module = node.get("py:module")
    candidates += [f"{module}.{target}"] if module else []
    candidates += [f"curvopt.{target}"]
  domain = env.get_domain("py")
  for candidate in candidates:
    canonical = _canonical(candidate, env)
    if canonical is None:
      continue
    for role in (node["reftype"], "obj"):
      new = node.deepcopy()
      new["reftarget"] = canonical
      result = domain.resolve_xref(env, node["refdoc"], app.builder, role, canonical, new, contnode)
      if result is not None:
        return result
  return None


def _skip_member(app, what, name, obj, skip, options):
  """Skips NamedTuple fields: the class's ``Attributes:`` section documents them already."""
  del app, what, name, options
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return skip


def setup(app):
  app.connect("missing-reference", _resolve_reexport)
  app.connect("autodoc-skip-member", _skip_member)
