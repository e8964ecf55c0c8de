"""Thread control shared by every kernel, and ``show_config``.

cdl parallelises with OpenMP over fixed chunks of work. Dense layers call
SciPy's BLAS once per chunk from inside those threads, so that BLAS library
is kept single-threaded: cdl's own threads are the parallelism, and results
do not depend on the thread count.
"""
import contextlib
import ctypes
import itertools
import os
import platform
import sys

from ._kernels import _runtime

__all__ = ["default_num_threads", "blas_info", "get_num_threads", "set_num_threads", "threads",
           "config", "show_config"]

_state = {"threads": None, "blas_pinned": False, "explicit": False}


def _cgroup_cpu_limit():
    """CPU quota of this process's cgroup (v2 ``cpu.max`` or v1), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, int(int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, quota // period)
    except (OSError, ValueError):
        pass
    return None


def usable_cores():
    """The cores this process may use: its CPU affinity, capped by the cgroup quota."""
    if hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    return max(1, min(n, quota) if quota else n)


def _omp_env_threads():
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


def default_num_threads():
    """OMP_NUM_THREADS if set, else the usable cores (affinity and cgroup quota)."""
    if not _runtime.openmp_enabled():
        return 1
    return _omp_env_threads() or usable_cores()


def threads_chosen():
    """Whether the thread count was chosen: by set_num_threads or OMP_NUM_THREADS
    (cdl.distributed only picks threads per rank where it was not)."""
    return _state["explicit"] or _omp_env_threads() is not None


def _blas_controllers():
    """threadpoolctl controllers of the BLAS library behind scipy.linalg.cython_blas."""
    import scipy.linalg.cython_blas  # noqa: F401  (make sure it is loaded)
    from threadpoolctl import ThreadpoolController

    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    scipy_dir = os.path.dirname(os.path.dirname(scipy.linalg.__file__))
    own = [c for c in libs if "scipy" in os.path.basename(os.path.dirname(c.filepath))
           or c.filepath.startswith(scipy_dir)]
    return own or libs


def blas_info():
    """(name, version, threads) of the BLAS cdl calls, as threadpoolctl reports it."""
    try:
        c = _blas_controllers()[0]
        return c.internal_api, c.version, c.num_threads, c.filepath
    except Exception as exc:  # threadpoolctl missing or no BLAS found
        return "unknown", None, None, str(exc)


def _pin_blas():
    """Keep SciPy's BLAS single-threaded, now and at every kernel call."""
    if _state["blas_pinned"]:
        return
    _state["blas_pinned"] = True
    try:
        controllers = _blas_controllers()
    except Exception:
        return  # no threadpoolctl or no BLAS it knows: calls still run, unpinned
    for c in controllers:
        c.set_num_threads(1)
        if c.internal_api != "openblas":
            continue
        # The kernels check the count before each parallel BLAS use, through the
        # library's own C functions (a user's threadpoolctl limit may raise it).
        lib = ctypes.CDLL(c.filepath)
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                _runtime.set_blas_thread_functions(
                    ctypes.cast(get, ctypes.c_void_p).value,
                    ctypes.cast(put, ctypes.c_void_p).value)
                break


def get_num_threads():
    """Number of OpenMP threads cdl's kernels use."""
    if _state["threads"] is None:
        _state["threads"] = default_num_threads()
    return _state["threads"]


def set_num_threads(n):
    """Set the threads cdl uses (kernels and the BLAS calls inside them)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    from .functional._checks import MAX_THREADS
    if n > MAX_THREADS:
        raise ValueError(f"set_num_threads: n={n} is more than the {MAX_THREADS} cdl supports")
    _pin_blas()
    _state["threads"] = n if _runtime.openmp_enabled() else 1
    _state["explicit"] = True


@contextlib.contextmanager
def threads(n):
    """``with cdl.threads(n):`` run the enclosed code with n threads, then restore."""
    old, explicit = get_num_threads(), _state["explicit"]
    set_num_threads(n)
    try:
        yield
    finally:
        _state["threads"], _state["explicit"] = old, explicit


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def config():
    """The facts ``show_config`` prints, as a dict."""
    from . import __version__
    from ._kernels import _dispatch
    import numpy

    name, version, blas_threads, path = blas_info()
    return {
        "cdl": __version__,
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "openmp": _runtime.openmp_enabled(),
        "threads": get_num_threads(),
        "cpu": _cpu_model(),
        "cores_usable": default_num_threads() if _runtime.openmp_enabled() else os.cpu_count(),
        "isa": _dispatch.ISA,
        "isa_supported": list(_dispatch.SUPPORTED),
        "blas": name,
        "blas_version": version,
        "blas_threads": blas_threads,
        "blas_path": path,
    }


def show_config(file=None):
    """Print the version, OpenMP status, threads, BLAS and instruction set in use."""
    c = config()
    omp = "on" if c["openmp"] else "off (kernels run serially)"
    lines = [
        f"cdl {c['cdl']}  (python {c['python']}, numpy {c['numpy']})",
        f"OpenMP:          {omp}",
        f"threads:         {c['threads']}  (usable cores: {c['cores_usable']})",
        f"CPU:             {c['cpu']}",
        f"instruction set: {c['isa']}  (supported: {', '.join(c['isa_supported'])})",
        f"BLAS:            {c['blas']} {c['blas_version']}, {c['blas_threads']} thread(s) per call"
        f" inside cdl's chunks  [{c['blas_path']}]",
    ]
    print("\n".join(lines), file=file)
