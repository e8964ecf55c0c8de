"""Thread control, build facts and instruction-set dispatch."""
import os
import re
import subprocess
import sys

import pytest

import cdl
from cdl import _config
from cdl._kernels import _dispatch, _runtime


def test_version_and_config():
    # PEP 440: release X.Y.Z, optionally a .devN / aN / bN / rcN suffix
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", cdl.__version__)
    c = _config.config()
    assert c["isa"] in c["isa_supported"]
    assert c["threads"] == cdl.get_num_threads()
    assert c["openmp"] == _runtime.openmp_enabled()


def test_show_config_prints_the_facts(capsys):
    cdl.show_config()
    out = capsys.readouterr().out
    for word in ("cdl " + cdl.__version__, "OpenMP:", "threads:", "instruction set:", "BLAS:"):
        assert word in out


def test_set_get_and_context_manager():
    before = cdl.get_num_threads()
    with cdl.threads(1):
        assert cdl.get_num_threads() == 1
        with cdl.threads(3):
            assert cdl.get_num_threads() == (3 if _runtime.openmp_enabled() else 1)
        assert cdl.get_num_threads() == 1
    assert cdl.get_num_threads() == before
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        cdl.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        cdl.set_num_threads(2.0)


def test_threads_context_restores_after_error():
    before = cdl.get_num_threads()
    with pytest.raises(RuntimeError):
        with cdl.threads(1):
            raise RuntimeError("boom")
    assert cdl.get_num_threads() == before


def test_scipy_blas_is_single_threaded_inside_cdl():
    """Inside cdl's calls SciPy's BLAS runs one thread; after them it has its count back
    (tests/test_load.py checks the count right after ``import cdl``)."""
    name, _, before, _ = _config.blas_info()
    if name == "unknown":
        pytest.skip("threadpoolctl cannot see SciPy's BLAS here")
    if not _runtime.blas_switchable():
        assert before == 1  # a BLAS without per-call switching stays at one thread
        return
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from cdl.functional import linear
    import numpy as np
    x = np.ones((64, 784))
    w = np.ones((256, 784))
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        count = _runtime.blas_lowered_count()
        linear(x, w, threads=2)  # float64: SciPy's dgemm per chunk
        assert _runtime.blas_lowered_count() > count  # it was 1 during the call
        assert _config.blas_info()[2] == 2  # and is given back after it


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)


def test_default_threads_respect_omp_num_threads():
    r = _run("import cdl; print(cdl.get_num_threads())", OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"



def test_omp_num_threads_above_the_limit_is_ignored_with_a_warning():
    """set_num_threads refuses more than 1024 threads; the same count from the environment
    is not taken as the default either, but it is said (libgomp accepts it silently)."""
    code = ("import warnings; warnings.simplefilter('always'); "
            "import cdl; from cdl import _config; "
            "n = cdl.get_num_threads(); chosen = _config.threads_chosen(); "
            "cdl.set_num_threads(n); "
            "print(n, _config.usable_cores() if _config._runtime.openmp_enabled() else 1, chosen)")
    r = _run(code, OMP_NUM_THREADS="99999")
    assert r.returncode == 0, r.stderr
    n, default, chosen = r.stdout.split()
    assert n == default and chosen == "False"
    assert r.stderr.count("OMP_NUM_THREADS=99999 is more than the 1024 threads cdl supports; "
                          "cdl ignores it") == 1, r.stderr
    if _runtime.openmp_enabled():
        r = _run("import cdl; print(cdl.get_num_threads())", OMP_NUM_THREADS="1024")
        assert r.returncode == 0 and r.stdout.strip() == "1024" and "1024 threads" not in r.stderr


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_forced_isa(isa):
    r = _run("import cdl._kernels._dispatch as d; print(d.ISA)", CDL_ISA=isa)
    if isa in _dispatch.SUPPORTED:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == isa
    else:
        assert "this CPU supports only" in r.stderr


def test_unknown_isa_is_refused():
    r = _run("import cdl", CDL_ISA="sse9")
    assert r.returncode != 0 and "expected one of baseline, avx2, avx512" in r.stderr
