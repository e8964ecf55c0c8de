"""The public namespace: ``dir(cdl)`` holds the documented API and nothing foreign.

The documented API is docs/api.rst; ``cdl.__all__`` must list exactly the names it
documents, and ``dir(cdl)`` may hold only those, private names and cdl's own
submodules. To add a public name: put it in ``cdl.__all__`` and in a section of
docs/api.rst (one line in an ``autosummary`` list).
"""
import importlib
import importlib.util
import pkgutil
import types
from pathlib import Path

import pytest

import cdl

ROOT = Path(__file__).resolve().parents[1]
API_RST = ROOT / "docs" / "api.rst"
PUBLIC_MODULES = ["cdl", "cdl.functional", "cdl.datasets"]


def _conf():
    """docs/conf.py, whose parser of api.rst the documentation build uses too."""
    if not API_RST.exists():
        pytest.skip("docs/ is not here (an installed package without its sources)")
    spec = importlib.util.spec_from_file_location("cdl_docs_conf", ROOT / "docs" / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def _autosummary(module):
    """The names listed in api.rst's autosummary blocks under ``.. currentmodule:: module``."""
    names, current, inside = [], None, False
    for line in API_RST.read_text().splitlines():
        if line.startswith(".. currentmodule::"):
            current = line.split("::")[1].strip()
        elif line.startswith(".. autosummary::"):
            inside = True
        elif inside and line.startswith("   ") and not line.strip().startswith(":"):
            if current == module:
                names.append(line.strip())
        elif inside and line.strip() and not line.startswith("   "):
            inside = False
    return names


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_lists_existing_names_once(name):
    mod = importlib.import_module(name)
    assert len(mod.__all__) == len(set(mod.__all__)), "duplicates in __all__"
    for n in mod.__all__:
        assert hasattr(mod, n), f"{name}.__all__ names {n!r}, which does not exist"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_dir_holds_only_public_api_and_own_submodules(name):
    mod = importlib.import_module(name)
    public = {n for n in dir(mod) if not n.startswith("_")}
    extra = public - set(mod.__all__)
    foreign = sorted(n for n in extra
                     if not (isinstance(getattr(mod, n), types.ModuleType)
                             and getattr(mod, n).__name__ == f"{name}.{n}"))
    assert not foreign, (f"dir({name}) has public names outside {name}.__all__: {foreign} "
                         f"(import them under a _private name, or add them to __all__ and "
                         f"docs/api.rst)")


def test_datasets_exports_only_its_functions():
    assert sorted(n for n in dir(cdl.datasets) if not n.startswith("_")) == \
        ["load_digits", "load_idx", "load_idx_dataset"]
    ns = {}
    exec("from cdl.datasets import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == sorted(cdl.datasets.__all__)


def test_all_is_the_documented_api():
    documented = _conf()._documented(API_RST)
    missing = sorted(set(cdl.__all__) - documented)
    extra = sorted(documented - set(cdl.__all__))
    assert not missing, f"in cdl.__all__ but not placed in docs/api.rst: {missing}"
    assert not extra, f"documented in docs/api.rst but not in cdl.__all__: {extra}"


@pytest.mark.parametrize("name", ["cdl.functional", "cdl.datasets"])
def test_submodule_api_is_documented(name):
    if not API_RST.exists():
        pytest.skip("docs/ is not here")
    mod = importlib.import_module(name)
    assert sorted(_autosummary(name)) == sorted(mod.__all__)


def test_api_rst_parser_sees_each_kind_of_entry(tmp_path, monkeypatch):
    """A parser that found nothing would make the comparison above vacuous."""
    conf = _conf()
    rst = tmp_path / "api.rst"
    rst.write_text(".. currentmodule:: cdl\n\n.. data:: __version__\n\n.. autosummary::\n"
                   "   :toctree: generated\n\n   Linear\n   SGD\n\nText\n\n"
                   ".. automodule:: cdl.functional\n   :no-members:\n\n"
                   ".. currentmodule:: cdl.functional\n\n.. autosummary::\n\n   linear\n")
    assert conf._documented(rst) == {"__version__", "Linear", "SGD", "functional"}


def _package_modules():
    out = []
    for info in pkgutil.walk_packages(cdl.__path__, "cdl."):
        if info.name == "cdl.__main__":  # runs the command on import
            continue
        spec = importlib.util.find_spec(info.name)
        if spec.origin and not spec.origin.endswith(".py"):  # compiled kernels
            continue
        out.append(info.name)
    return out


@pytest.mark.parametrize("name", ["cdl"] + _package_modules())
def test_every_module_has_an_all(name):
    mod = importlib.import_module(name)
    assert isinstance(getattr(mod, "__all__", None), (list, tuple)), f"{name} has no __all__"
    assert all(isinstance(n, str) for n in mod.__all__)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names missing attributes {missing}"


def test_main_module_has_an_all():
    src = (Path(cdl.__file__).parent / "__main__.py").read_text()
    assert "__all__ = [" in src


def test_docs_list_names_not_yet_placed_in_api_rst(monkeypatch):
    """A name added to cdl.__all__ shows up in the built docs (under "Other names") even
    before api.rst places it (test_all_is_the_documented_api then asks for a place)."""
    conf = _conf()

    class NewLayer:
        """A layer the lead adds."""

    monkeypatch.setattr(cdl, "NewLayer", NewLayer, raising=False)
    monkeypatch.setattr(cdl, "new_function", lambda: None, raising=False)
    monkeypatch.setattr(cdl, "__all__", list(cdl.__all__) + ["NewLayer", "new_function"])
    target = ROOT / "docs" / "_generated" / "ungrouped.rst.txt"
    try:
        conf._write_ungrouped(None)
        text = target.read_text()
        assert ".. autoclass:: NewLayer" in text and ".. autofunction:: new_function" in text
        assert "Sequential" not in text  # placed names are not repeated
    finally:
        monkeypatch.undo()
        conf._write_ungrouped(None)
    assert target.read_text().strip() == ""
