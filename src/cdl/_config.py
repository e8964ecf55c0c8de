"""Thread control shared by every kernel, and ``show_config``.

cdl parallelises with OpenMP over fixed chunks of work, so results do not depend
on the thread count. Two things here keep it fast beside other work:

* Adaptive thread count (on by default; ``cdl.set_num_threads(n, adaptive=False)``
  or ``CDL_ADAPTIVE_THREADS=0`` turn it off). Before each call cdl reads, at most
  every 2 ms, how many tasks are runnable on the machine (``/proc/loadavg``),
  discounts its own running threads and runs on no more threads than there are
  free CPUs (at least one, at most the configured count). Every OpenMP region ends
  at a barrier, so a thread that has to share its core with other work stalls the
  whole step; one thread on a free core is then many times faster. See
  ``cdl._kernels._runtime`` for the rule.
* SciPy's BLAS. Dense layers may call SciPy's BLAS once per chunk from inside their
  threads; such a call must be single-threaded. The kernels set SciPy's BLAS to
  one thread just before they need it and cdl's public calls give it back its
  previous count when they return, so importing cdl changes nothing and a user's
  own ``scipy.linalg`` calls keep their threads. NumPy's BLAS is never touched.
"""
import contextlib
import ctypes
import itertools
import os
import platform
import sys
import warnings

import numpy as np

from ._kernels import _runtime

__all__ = ["default_num_threads", "blas_info", "get_num_threads", "set_num_threads", "threads",
           "get_adaptive", "set_adaptive", "step_threads", "thread_status", "adaptive_status",
           "config", "show_config"]

_state = {"threads": None, "blas_pinned": False, "explicit": False, "adaptive": None,
          "omp_env_warned": False}

_OFF = ("0", "false", "off", "no")


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


def physical_memory():
    """This machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
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
    """The first count in OMP_NUM_THREADS, or None where it gives none cdl can use: the
    default applies then, as set_num_threads would refuse the value. libgomp itself
    warns about a value that is not a count; one above cdl's limit it accepts, so cdl
    warns about that (once)."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not (env.isascii() and env.isdigit() and int(env) > 0):    # ("²".isdigit() is True)
        return None
    from .functional._checks import MAX_THREADS
    if int(env) > MAX_THREADS:
        if not _state["omp_env_warned"]:
            _state["omp_env_warned"] = True
            warnings.warn(f"OMP_NUM_THREADS={env} is more than the {MAX_THREADS} threads cdl "
                          f"supports; cdl ignores it and uses the usable cores "
                          f"({usable_cores()}); cdl.set_num_threads(n) sets another count",
                          stacklevel=2)
        return None
    return int(env)


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
    """Find SciPy's BLAS and hand its get/set-threads functions to the kernels, which
    keep it single-threaded during their calls (``ensure_single_threaded_blas``);
    ``restore_blas`` gives it back its count when a public call returns. The count
    itself is not changed here: importing cdl leaves SciPy's BLAS as it was."""
    if _state["blas_pinned"]:
        return
    _state["blas_pinned"] = True
    try:
        controllers = _blas_controllers()
    except Exception:
        return  # no threadpoolctl or no BLAS it knows: calls still run, unpinned
    for c in controllers:
        if c.internal_api != "openblas":
            # No C entry points to switch per call: keep it single-threaded throughout
            # (documented in the README's Threads section).
            c.set_num_threads(1)
            continue
        lib = ctypes.CDLL(c.filepath)
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                _runtime.set_blas_thread_functions(
                    ctypes.cast(get, ctypes.c_void_p).value,
                    ctypes.cast(put, ctypes.c_void_p).value)
                break
        else:
            c.set_num_threads(1)


restore_blas = _runtime.restore_blas
fork_safe_threads = _runtime.fork_safe_threads


def _env_adaptive():
    return os.environ.get("CDL_ADAPTIVE_THREADS", "1").strip().lower() not in _OFF


def _online_cpus():
    """CPUs of the whole machine: /proc/loadavg counts its runnable tasks."""
    try:
        return os.sysconf("SC_NPROCESSORS_ONLN")
    except (ValueError, OSError, AttributeError):
        return os.cpu_count() or 1


def get_num_threads():
    """Number of OpenMP threads cdl's kernels use (at most; see ``get_adaptive``)."""
    if _state["threads"] is None:
        _state["threads"] = default_num_threads()
    return _state["threads"]


def get_adaptive():
    """Whether cdl runs on fewer threads while other work holds the cores."""
    if _state["adaptive"] is None:
        set_adaptive(_env_adaptive())
    return _state["adaptive"]


def set_adaptive(on):
    """Turn the adaptive thread count on or off (default: on, unless
    ``CDL_ADAPTIVE_THREADS=0``)."""
    _check_adaptive(on, "set_adaptive")
    _state["adaptive"] = bool(on)
    _runtime.set_adaptive(bool(on), _online_cpus())


def _check_adaptive(on, where):
    if not isinstance(on, (bool, int, np.bool_, np.integer)):
        raise TypeError(f"{where}: adaptive must be True or False, got {type(on).__name__}")
    if on not in (0, 1):
        raise ValueError(f"{where}: adaptive must be True or False, got {on!r}")


def step_threads(_state=_state, _step=_runtime.step_threads):
    """Threads for the next kernel call: the configured count, or fewer while other
    work holds the cores (adaptive mode, re-read at most every 2 ms)."""
    n = _state["threads"]
    if n is None:
        n = get_num_threads()
    return _step(n)


def set_num_threads(n=None, adaptive=None):
    """Set the threads cdl uses (kernels and the BLAS calls inside them).

    ``n``: the most threads a call uses (None leaves it). ``adaptive``: True runs on
    fewer threads while other work holds the cores, False always on ``n``; None
    leaves the setting (default on, unless ``CDL_ADAPTIVE_THREADS=0``). Results are
    bit-identical for any thread count, so neither changes them."""
    # everything is checked before anything changes
    if adaptive is not None:
        _check_adaptive(adaptive, "set_num_threads")
    if n is not None:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
        n = int(n)
        if n < 1:
            raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
        from .functional._checks import MAX_THREADS
        if n > MAX_THREADS:
            raise ValueError(f"set_num_threads: n={n} is more than the {MAX_THREADS} cdl "
                             f"supports")
    if adaptive is not None:
        set_adaptive(adaptive)
    if n is None:
        return
    _pin_blas()
    _state["threads"] = n if _runtime.openmp_enabled() else 1
    _state["explicit"] = True


@contextlib.contextmanager
def threads(n=None, adaptive=None):
    """``with cdl.threads(n):`` run the enclosed code with n threads, then restore;
    ``adaptive=`` likewise sets the adaptive thread count for the block."""
    old, explicit = get_num_threads(), _state["explicit"]
    old_adaptive = get_adaptive()
    set_num_threads(n, adaptive)
    try:
        yield
    finally:
        _state["threads"], _state["explicit"] = old, explicit
        if get_adaptive() != old_adaptive:
            set_adaptive(old_adaptive)


def adaptive_status():
    """What the adaptive thread count last saw: a dict with ``adaptive``,
    ``online_cpus``, the last reading (``runnable`` tasks on the machine,
    ``own_running`` of them cdl's, ``others``), ``capacity`` (threads that reading
    allows; None before the first), counters of readings and reduced calls, and the
    wake-up of sleeping workers after a pause: ``wake`` (on), ``wake_pause_s``,
    ``team_idle`` (back-to-back calls leave the workers unused: no wake), ``wakes``
    and ``wake_moves`` (workers moved off a CPU the team already used)."""
    get_adaptive()
    return _runtime.adaptive_state()


def thread_status():
    """``cdl.thread_status()``: the configured ``threads``, whether ``adaptive`` is on,
    and what the adaptive count last read (see ``adaptive_status``)."""
    return dict(adaptive_status(), threads=get_num_threads())


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
        "cores_usable": usable_cores() if _runtime.openmp_enabled() else os.cpu_count(),
        "isa": _dispatch.ISA,
        "isa_supported": list(_dispatch.SUPPORTED),
        "blas": name,
        "blas_version": version,
        "blas_threads": blas_threads,
        "blas_path": path,
        "blas_per_call": bool(_runtime.blas_switchable()),
        "adaptive": adaptive_status(),
        "omp_wait": _omp_wait(),
    }


def _omp_wait():
    """How idle OpenMP threads wait (libgomp reads these when it loads)."""
    set_ = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    if set_:
        return ", ".join(f"{k}={v}" for k, v in set_.items())
    return "default (libgomp: spin about 300000 times, a few ms, then sleep)"


def _adaptive_line(a, threads):
    if a["forked_child"]:
        return ("this process was forked after its parent ran OpenMP teams: every call runs on "
                "1 thread (GNU OpenMP cannot start a team in such a child)")
    if not a["adaptive"]:
        return (f"off (always {threads} thread(s); cdl.set_num_threads(adaptive=True) or "
                f"CDL_ADAPTIVE_THREADS=1 turn it on)")
    text = (f"on (fewer threads while other work holds the {a['online_cpus']} CPU(s); "
            f"load re-read every {a['interval_s'] * 1e3:g} ms; off: CDL_ADAPTIVE_THREADS=0)")
    if a["samples"]:
        cap = a["capacity"]
        text += (f"; last reading: {a['runnable']} runnable task(s), {a['own_running']} of "
                 f"them cdl's -> {min(cap, threads) if cap else threads} thread(s)")
    if a["wakes"]:
        text += (f"; sleeping workers woken {a['wakes']} time(s), {a['wake_moves']} moved off "
                 f"the caller's CPU")
    return text


def _blas_line(c):
    if c["blas_per_call"]:
        return (f"{c['blas_threads']} thread(s) for your own calls; 1 inside cdl's chunks "
                f"(set by each cdl call, restored when it returns)")
    return f"{c['blas_threads']} thread(s), kept at 1 for cdl's chunks"


def show_config(file=None):
    """Print the version, OpenMP status, threads, BLAS and instruction set in use."""
    if file is not None and not callable(getattr(file, "write", None)):
        raise TypeError(f"show_config: file must be a text stream (e.g. sys.stdout or "
                        f"open(path, 'w')), got {type(file).__name__}")
    c = config()
    omp = "on" if c["openmp"] else "off (kernels run serially)"
    lines = [
        f"cdl {c['cdl']}  (python {c['python']}, numpy {c['numpy']})",
        f"OpenMP:          {omp}",
        f"threads:         {c['threads']}  (usable cores: {c['cores_usable']})",
        f"adaptive:        {_adaptive_line(c['adaptive'], c['threads'])}",
        f"OpenMP wait:     {c['omp_wait']}",
        f"CPU:             {c['cpu']}",
        f"instruction set: {c['isa']}  (supported: {', '.join(c['isa_supported'])})",
        f"BLAS:            SciPy's {c['blas']} {c['blas_version']}, {_blas_line(c)}"
        f"  [{c['blas_path']}]",
    ]
    print("\n".join(lines), file=file)
