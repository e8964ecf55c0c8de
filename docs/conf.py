"""Sphinx configuration for cdl's documentation.

Build (from the repository root, with cdl installed, e.g. pip install ".[docs]"):

    sphinx-build -W -b html docs docs/_build

The API reference (api.rst) is generated from the docstrings (numpydoc style, read by
napoleon) with autosummary. Any name in ``cdl.__all__`` that api.rst does not place in
a section yet is listed automatically under "Other names" (tests/test_api.py asks for
it to be placed).
"""
import os
import re

import cdl

HERE = os.path.dirname(os.path.abspath(__file__))

project = "cdl"
author = "cdl developers"
copyright = "2026, cdl developers"
release = cdl.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated/*.rst.txt"]
root_doc = "index"

# numpydoc-style docstrings through napoleon; prose docstrings pass through unchanged.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "none"
autodoc_preserve_defaults = True
add_module_names = False
nitpicky = False  # cross-references to numpy etc. are not resolved offline

html_theme = "alabaster"
html_title = f"cdl {release}"
html_static_path = []


def _documented(path):
    """Top-level names that api.rst documents: autosummary entries under
    ``.. currentmodule:: cdl``, ``.. automodule:: cdl.<name>``, ``.. data:: <name>``."""
    names, current, in_summary = set(), None, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"\.\. currentmodule:: (\S+)", line)
            if m:
                current = m.group(1)
                continue
            m = re.match(r"\.\. automodule:: cdl\.(\w+)$", line.strip())
            if m:
                names.add(m.group(1))
                continue
            m = re.match(r"\.\. (?:auto)?data:: (\w+)", line.strip())
            if m and current == "cdl":
                names.add(m.group(1))
                continue
            if line.startswith(".. autosummary::"):
                in_summary = True
                continue
            if in_summary:
                if line.strip() == "" or line.strip().startswith(":"):
                    continue
                if line.startswith("   "):
                    if current == "cdl":
                        names.add(line.strip())
                    continue
                in_summary = False
    return names


def _write_ungrouped(app):
    """docs/_generated/ungrouped.rst.txt: names in cdl.__all__ that api.rst has no place for."""
    import inspect

    missing = [n for n in cdl.__all__ if n not in _documented(os.path.join(HERE, "api.rst"))]
    os.makedirs(os.path.join(HERE, "_generated"), exist_ok=True)
    lines = []
    if missing:
        lines = ["Other names", "-----------", "", ".. currentmodule:: cdl", ""]
        for n in missing:
            obj = getattr(cdl, n)
            kind = ("automodule" if inspect.ismodule(obj) else "autoclass" if inspect.isclass(obj)
                    else "autofunction" if callable(obj) else "autodata")
            lines += [f".. {kind}:: cdl.{n}" if kind == "automodule" else f".. {kind}:: {n}", ""]
    text = "\n".join(lines) + "\n"
    target = os.path.join(HERE, "_generated", "ungrouped.rst.txt")
    old = open(target).read() if os.path.exists(target) else None
    if old != text:
        with open(target, "w") as f:
            f.write(text)


def setup(app):
    app.connect("builder-inited", _write_ungrouped)
