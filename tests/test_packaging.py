"""Packaging: the distribution's metadata, the extras, the build settings and what the
sdist holds (and leaves out)."""
import importlib.util
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import cdl

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(PYPROJECT.read_text())


def test_distribution_name_licence_and_classifiers():
    p = _pyproject()["project"]
    assert p["name"] == "cdl-cpu"
    assert p["license"] == "MIT" and p["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert p["authors"] == [{"name": "cdl developers"}]
    assert not [c for c in p["classifiers"] if c.startswith("License ::")]  # PEP 639
    versions = [c.rsplit(" ", 1)[1] for c in p["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions[0] == "3.9" and p["requires-python"] == ">=3.9"
    assert "version" in p["dynamic"]  # from cdl.__version__


def test_extras():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["onnx"] == ["onnx>=1.16"]
    assert extras["safetensors"] == ["safetensors>=0.4"]
    assert extras["mpi"] == ["mpi4py>=3.1", "mpich"]
    assert extras["dask"] == ["dask[distributed]>=2023.1"]
    assert any(r.startswith("sphinx") for r in extras["docs"])
    test = extras["test"]
    for name in ("onnx", "onnxruntime", "safetensors", "mpi4py", "mpich", "dask[distributed]",
                 "cloudpickle", "pytest", "hypothesis", "scikit-learn"):
        assert any(re.match(re.escape(name) + r"($|[<>=!~])", r) for r in test), name


def test_build_settings():
    p = _pyproject()
    skb = p["tool"]["scikit-build"]
    assert skb["build-dir"] == "build/{wheel_tag}"  # a second install reuses objects
    assert any(r.startswith("cython>=3.1") for r in p["build-system"]["requires"])
    assert "cibuildwheel" in p["tool"]
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "-m cython" in cmake and "find_package(Cython" not in cmake
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in ("cdl-out/", "build/", "wheelhouse/", "docs/_build/"):
        assert entry in ignored


def test_installed_metadata_matches():
    from importlib import metadata
    try:
        dist = metadata.distribution("cdl-cpu")
    except metadata.PackageNotFoundError:
        pytest.skip("cdl is not installed as the cdl-cpu distribution here")
    assert dist.version == cdl.__version__
    assert dist.metadata["License-Expression"] == "MIT"
    assert dist.metadata["Requires-Python"] == ">=3.9"
    assert [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "cdl"]


def test_sdist_holds_sources_and_no_generated_files(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("builds the sdist from a checkout")
    for mod in ("build", "scikit_build_core", "pathspec"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"needs {mod} to build an sdist without network")
    out = ROOT / "cdl-out"  # what `cdl train` leaves in a checkout
    created = not out.exists()
    out.mkdir(exist_ok=True)
    marker = out / "sdist-test-marker.txt"
    marker.write_text("must not end up in the sdist")
    try:
        r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-x",
                            "-o", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                           timeout=300)
    finally:
        marker.unlink()
        if created:
            out.rmdir()
    assert r.returncode == 0, r.stdout + r.stderr
    (sdist,) = tmp_path.glob("cdl_cpu-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for must in ("pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", "CHANGELOG.md",
                 "src/cdl/__init__.py", "src/cdl/_kernels/_conv.pyx",
                 "src/cdl/_kernels/_blas.pxd", "src/cdl/_kernels/cdl_gemm.h",
                 "tests/test_api.py", "docs/conf.py", "docs/tutorial.rst", "bench/run.py"):
        assert must in names, must
    for name in names:
        assert not name.startswith((".ci/", "tools/", "bench/results/", "cdl-out/", "build/",
                                    "docs/_build/", "wheelhouse/")), name
        assert not name.endswith((".so", ".o", ".pyc")), name
