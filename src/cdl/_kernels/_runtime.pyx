# cython: language_level=3
"""Build and CPU facts the Python side needs: OpenMP present, CPU instruction sets."""
from cdl._kernels._openmp cimport (CDL_HAVE_OPENMP, omp_get_max_threads,
                          cdl_cpu_has_avx2_fma, cdl_cpu_has_avx512)


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(CDL_HAVE_OPENMP)


def openmp_max_threads():
    return omp_get_max_threads()


def cpu_supports():
    """Instruction sets usable on this CPU (and enabled by the OS), best last."""
    isas = ["baseline"]
    if cdl_cpu_has_avx2_fma():
        isas.append("avx2")
    if cdl_cpu_has_avx512():
        isas.append("avx512")
    return isas


ctypedef int (*get_threads_fn)() noexcept nogil
ctypedef void (*set_threads_fn)(int) noexcept nogil
cdef get_threads_fn _blas_get_threads = NULL
cdef set_threads_fn _blas_set_threads = NULL


def set_blas_thread_functions(size_t get_address, size_t set_address):
    """Register the BLAS library's get/set-num-threads C functions (addresses)."""
    global _blas_get_threads, _blas_set_threads
    _blas_get_threads = <get_threads_fn>get_address
    _blas_set_threads = <set_threads_fn>set_address


# Several Python threads run kernels at once, and one's public call may return while
# another is inside its BLAS chunks: restoring the user's thread count then would run
# those chunks multi-threaded (not bit-identical). So the kernels count themselves in
# and out (``_blas_users``), and the count is restored only when none is inside. The
# counter and the thread count change together under one spinlock: held for a few
# instructions, by callers with or without the GIL.
cdef extern from *:
    """
    #include <sched.h>
    static int cdl_blas_spin = 0;
    static void cdl_blas_lock(void) {
        while (__atomic_exchange_n(&cdl_blas_spin, 1, __ATOMIC_ACQUIRE))
            while (__atomic_load_n(&cdl_blas_spin, __ATOMIC_RELAXED)) sched_yield();
    }
    static void cdl_blas_unlock(void) { __atomic_store_n(&cdl_blas_spin, 0, __ATOMIC_RELEASE); }
    """
    void cdl_blas_lock() nogil
    void cdl_blas_unlock() nogil

cdef int _blas_saved = 0      # SciPy's BLAS thread count before cdl lowered it (0: not lowered)
cdef long _blas_lowered = 0   # how many times cdl lowered it (tests, show_config)
cdef long _blas_users = 0     # kernels between ensure_single_threaded_blas and blas_done


cdef void ensure_single_threaded_blas() noexcept nogil:
    """Called by the dense kernels before their BLAS calls inside OpenMP chunks; each
    call is paired with ``blas_done`` when the kernel's BLAS work is over. The count the
    user had is restored by ``restore_blas`` when cdl's public call returns."""
    global _blas_saved, _blas_lowered, _blas_users
    cdef int n
    cdl_blas_lock()
    _blas_users += 1
    if _blas_get_threads != NULL:
        n = _blas_get_threads()
        if n != 1:
            if _blas_saved == 0:
                _blas_saved = n
            _blas_lowered += 1
            _blas_set_threads(1)
    cdl_blas_unlock()


cdef void blas_done() noexcept nogil:
    """A kernel's BLAS calls are over (pairs ``ensure_single_threaded_blas``)."""
    global _blas_users
    cdl_blas_lock()
    _blas_users -= 1
    cdl_blas_unlock()


cpdef void restore_blas() noexcept:
    """Give SciPy's BLAS back the thread count it had before a cdl call lowered it,
    unless a kernel (another thread's) is still using it: the last call to return
    restores it then."""
    global _blas_saved
    cdef int n
    cdl_blas_lock()
    n = _blas_saved
    if n != 0 and _blas_users == 0:
        _blas_saved = 0
        if _blas_set_threads != NULL and _blas_get_threads() == 1:
            _blas_set_threads(n)
    cdl_blas_unlock()


def blas_switchable():
    """Whether the kernels can set SciPy's BLAS threads per call (functions registered)."""
    return _blas_get_threads != NULL


def blas_lowered_count():
    """How many times a kernel lowered SciPy's BLAS to one thread for its chunks."""
    return _blas_lowered


def blas_users():
    """How many kernels are using SciPy's BLAS now (tests: 0 between calls)."""
    return _blas_users


# ---------------------------------------------------------------- adaptive thread count
# A step is a few dozen short OpenMP regions, each ending at a barrier that waits for
# every thread. When other work holds the cores, one preempted thread stalls the
# others for a scheduler time slice at each barrier, and 2 threads on 2 busy cores
# run many times slower than 1. Before a call cdl asks ``step_threads(n)``: at most
# every ``interval`` seconds it reads the machine's runnable-task count (field 4 of
# /proc/loadavg), takes away its own running threads (the caller and those of its
# OpenMP workers that are running, i.e. spinning, read from /proc/self/task/<tid>/stat)
# and runs on min(n, online CPUs - other runnable tasks) threads, at least 1.
# The count goes down or up only as far as the previous reading also allowed, unless
# that reading is older than ``hold`` seconds (after a pause one reading is enough);
# a reading that would lower it is checked by a second one taken at once. The work is
# split in chunks fixed by the shapes, so any thread count gives bit-identical results:
# this changes speed only.
cdef extern from *:
    """
    #include <fcntl.h>
    #include <unistd.h>
    #include <stdio.h>
    #include <string.h>
    #include <time.h>
    #include <sys/syscall.h>
    #include <sys/types.h>
    #ifdef _OPENMP
    #include <omp.h>
    #endif
    #include <pthread.h>
    #include <sched.h>
    #define CDL_MAX_TIDS 1024
    static int cdl_loadavg_fd = -1;
    /* GNU OpenMP cannot start a team in a child forked after the parent ran one (the
       child's pool refers to threads it does not have, and the region hangs): such a
       child runs every call on one thread. */
    static int cdl_team_used = 0;
    static int cdl_forked_child = 0;
    static void cdl_atfork_child(void) { if (cdl_team_used) cdl_forked_child = 1; }
    static int cdl_atfork_registered = 0;
    static void cdl_register_atfork(void) {
        if (!cdl_atfork_registered) {
            cdl_atfork_registered = 1;
            pthread_atfork(NULL, NULL, cdl_atfork_child);
        }
    }
    static pid_t cdl_fds_pid = 0;
    static int cdl_ntids = 0;
    static pid_t cdl_tids[CDL_MAX_TIDS];
    static int cdl_tid_fds[CDL_MAX_TIDS];

    static double cdl_monotonic(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }

    static void cdl_forget_tids(void) {
        for (int i = 0; i < cdl_ntids; i++)
            if (cdl_tid_fds[i] >= 0) close(cdl_tid_fds[i]);
        cdl_ntids = 0;
    }

    /* After fork the child has none of the parent's threads: start over (returns 1). */
    static int cdl_check_pid(void) {
        pid_t pid = getpid();
        if (pid != cdl_fds_pid) {
            if (cdl_fds_pid != 0) cdl_forget_tids();
            cdl_ntids = 0;
            cdl_fds_pid = pid;
            return 1;
        }
        return 0;
    }

    /* Runnable tasks on the machine now (field 4 of /proc/loadavg, "R/T"), or -1. */
    static int cdl_read_runnable(void) {
        char buf[160];
        if (cdl_loadavg_fd < 0) {
            cdl_loadavg_fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
            if (cdl_loadavg_fd < 0) return -1;
        }
        ssize_t k = pread(cdl_loadavg_fd, buf, sizeof buf - 1, 0);
        if (k <= 0) return -1;
        buf[k] = 0;
        char *p = buf;
        int spaces = 0;
        while (*p && spaces < 3) { if (*p == ' ') spaces++; p++; }
        if (*p < '0' || *p > '9') return -1;
        int r = 0;
        while (*p >= '0' && *p <= '9') r = r * 10 + (*p++ - '0');
        return r;
    }

    /* Record the thread ids of the OpenMP team this thread gets for n threads. */
    static int cdl_collect_tids(int n) {
        cdl_check_pid();
        if (cdl_forked_child) n = 1;
        if (n > 1) cdl_team_used = 1;
        cdl_forget_tids();
        if (n > CDL_MAX_TIDS) n = CDL_MAX_TIDS;
        pid_t got[CDL_MAX_TIDS];
        int team = 1;
        got[0] = (pid_t)syscall(SYS_gettid);
    #ifdef _OPENMP
        #pragma omp parallel num_threads(n)
        {
            int t = omp_get_thread_num();
            if (t < CDL_MAX_TIDS) got[t] = (pid_t)syscall(SYS_gettid);
            #pragma omp single
            team = omp_get_num_threads();
        }
    #endif
        pid_t self = (pid_t)syscall(SYS_gettid);
        char path[64];
        for (int t = 0; t < team && t < CDL_MAX_TIDS; t++) {
            if (got[t] == self) continue;
            snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)got[t]);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            cdl_tids[cdl_ntids] = got[t];
            cdl_tid_fds[cdl_ntids++] = fd;
        }
        return cdl_ntids;
    }

    /* How many of the recorded worker threads are running (state R), or -1 when one
       is gone (the ids must be collected again). */
    static char cdl_tid_running[CDL_MAX_TIDS];   /* what the last call saw, team order */
    static int cdl_workers_running(void) {
        char buf[512];
        int running = 0;
        for (int i = 0; i < cdl_ntids; i++) {
            ssize_t k = pread(cdl_tid_fds[i], buf, sizeof buf - 1, 0);
            if (k <= 0) return -1;
            buf[k] = 0;
            char *p = strrchr(buf, ')');
            if (p == NULL || p[1] != ' ') return -1;
            cdl_tid_running[i] = p[2] == 'R';
            if (p[2] == 'R') running++;
        }
        return running;
    }
    /* Sleeping workers among the first k recorded ones (a team of k + 1). */
    static int cdl_workers_asleep(int k) {
        int asleep = 0;
        for (int i = 0; i < k && i < cdl_ntids; i++) asleep += !cdl_tid_running[i];
        return asleep;
    }

    /* Wake a team of n whose workers sleep, each on a CPU of its own. A sleeping worker
       that is woken is queued on the waking thread's CPU when the other CPUs look busy
       to the scheduler, as idle (halted) vCPUs of a VM do: on the 2-vCPU VM this was
       measured on, it then waited a time slice (4-12 ms) behind the caller spinning at
       the region's barrier, on every first call after a pause. Here the caller yields
       until every worker has arrived, and a worker that finds its CPU taken by an
       earlier member moves itself to the next allowed CPU no member has taken yet
       (searching upwards from its own, so teams do not all crowd the low CPUs) and
       restores its mask (the kernel moves a thread at once when its CPU leaves its
       mask). Whether that CPU is idle is not known here; the load readings keep the
       team no larger than the free CPUs. Returns how many workers moved, or -1 when
       the process may use fewer than 2 CPUs (nothing to do). */
    static int cdl_wake_team(int n) {
        int moved = 0;
    #if defined(_OPENMP) && defined(__linux__)
        int arrived = 0;
        cpu_set_t claimed, allowed;
        if (sched_getaffinity(0, sizeof allowed, &allowed) != 0 || CPU_COUNT(&allowed) < 2)
            return -1;
        CPU_ZERO(&claimed);
        #pragma omp parallel num_threads(n)
        {
            int team = omp_get_num_threads();
            int cpu, target = -1;
            if (omp_get_thread_num() == 0) {
                cpu = sched_getcpu();
                if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_SET(cpu, &claimed);
                __atomic_add_fetch(&arrived, 1, __ATOMIC_SEQ_CST);
                while (__atomic_load_n(&arrived, __ATOMIC_SEQ_CST) < team) sched_yield();
            } else {
                cpu_set_t mask, one;
                int have_mask = sched_getaffinity(0, sizeof mask, &mask) == 0;
                while (__atomic_load_n(&arrived, __ATOMIC_SEQ_CST) < 1) sched_yield();
                #pragma omp critical(cdl_wake_team)
                {
                    cpu = sched_getcpu();
                    if (cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &claimed) && have_mask) {
                        for (int j = 1; j < CPU_SETSIZE; j++) {
                            int c = (cpu + j) % CPU_SETSIZE;
                            if (CPU_ISSET(c, &mask) && !CPU_ISSET(c, &claimed)) { target = c; break; }
                        }
                    }
                    if (target >= 0) CPU_SET(target, &claimed);
                    else if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_SET(cpu, &claimed);
                }
                if (target >= 0) {
                    CPU_ZERO(&one);
                    CPU_SET(target, &one);
                    if (sched_setaffinity(0, sizeof one, &one) == 0) {
                        /* the mask it had; failing that (the CPU set changed meanwhile),
                           the process's main thread's, never the single CPU */
                        if (sched_setaffinity(0, sizeof mask, &mask) != 0
                                && (sched_getaffinity(getpid(), sizeof mask, &mask) != 0
                                    || sched_setaffinity(0, sizeof mask, &mask) != 0))
                            sched_setaffinity(0, sizeof allowed, &allowed);
                        __atomic_add_fetch(&moved, 1, __ATOMIC_SEQ_CST);
                    }
                }
                __atomic_add_fetch(&arrived, 1, __ATOMIC_SEQ_CST);
            }
        }
    #else
        (void)n;
    #endif
        return moved;
    }
    """
    int cdl_wake_team(int n) nogil
    int cdl_read_runnable() nogil
    int cdl_collect_tids(int n) nogil
    int cdl_workers_running() nogil
    int cdl_workers_asleep(int k) nogil
    int cdl_check_pid() nogil
    int cdl_team_used
    int cdl_forked_child
    void cdl_register_atfork() nogil
    double cdl_monotonic() nogil
    int cdl_ntids

cdef int _adaptive = 1          # on unless CDL_ADAPTIVE_THREADS=0 / set_adaptive(False)
cdef int _online = 1            # CPUs of the machine (the runnable count is machine-wide)
cdef double _interval = 0.002   # seconds between two load readings
cdef double _hold = 0.005       # a previous reading older than this does not hold the count down
cdef double _last_sample = -1e300
cdef double _prev_time = -1e300 # the previous reading: when, and how many threads it allowed
cdef int _prev_allowed = 0
cdef int _capacity = 1 << 30    # threads the last readings allow
cdef int _team = 0              # team size whose worker ids are recorded
cdef int _fake_runnable = -1    # tests: a made-up reading instead of /proc
cdef int _fake_own = -1
cdef int _fake_confirm = -1     # tests: what the confirming second reading sees (-1: the same)
cdef int _fake_asleep = 0       # tests: sleeping workers a made-up reading reports
# what the last reading saw, for show_config and the benchmark
cdef int _seen_runnable = -1
cdef int _seen_own = -1
cdef int _seen_others = -1
cdef long _samples = 0
cdef long _rereads = 0          # drops checked by a second reading
cdef long _reduced_calls = 0
cdef long _calls = 0
cdef bint _fake_read = False    # the last reading was made up (tests)
cdef int _wake = 1              # wake sleeping workers onto CPUs of their own (cdl_wake_team)
cdef double _pause = 0.005      # a call this long after the previous one follows a pause
cdef double _last_call = -1e300
cdef bint _team_idle = False    # back-to-back calls leave the workers asleep (unused)
cdef long _wakes = 0
cdef long _wake_moves = 0


def decide(int requested, int runnable, int own_running, int online):
    """Threads allowed by one reading: ``runnable`` tasks on the machine, of which
    ``own_running`` are cdl's (the caller and its running workers), on ``online`` CPUs."""
    cdef int others = runnable - own_running
    if others < 0:
        others = 0
    cdef int free = online - others
    if free > requested:
        free = requested
    return free if free > 1 else 1


cdef int _read_others(int requested, int* own_out, bint confirming) noexcept nogil:
    """One reading: (runnable tasks, with cdl's own running threads in own_out), or -1."""
    global _team, _fake_read
    cdef int runnable, workers
    # The ids of the largest team a call can get: no more threads than CPUs (a larger
    # team, collected once, would be shrunk by the calls and collected again and again).
    cdef int team = requested if requested < _online else _online
    if _fake_runnable >= 0:
        own_out[0] = _fake_own if _fake_own >= 0 else 1
        _fake_read = True
        if confirming and _fake_confirm >= 0:
            return _fake_confirm
        return _fake_runnable
    _fake_read = False
    runnable = cdl_read_runnable()
    if runnable < 0:
        return -1
    if cdl_check_pid() or _team != team:
        cdl_collect_tids(team)
        _team = team
    workers = cdl_workers_running()
    if workers < 0:
        cdl_collect_tids(team)
        workers = cdl_workers_running()
        if workers < 0:
            workers = 0
    own_out[0] = 1 + workers
    return runnable


cdef int _sample(int requested, double now) noexcept nogil:
    """Read the load and update the capacity; returns the capacity."""
    global _last_sample, _capacity, _prev_time, _prev_allowed, _samples, _rereads
    global _seen_runnable, _seen_own, _seen_others
    cdef int runnable, own, others, allowed, up_to, down_to, runnable2, own2, others2
    runnable = _read_others(requested, &own, False)
    if runnable < 0:                   # no /proc/loadavg: nothing to adapt to
        _capacity = 1 << 30
        return _capacity
    others = runnable - own if runnable > own else 0
    allowed = _online - others if _online - others > 1 else 1
    if allowed < _capacity:
        # A lowering reading is checked by a second one at once: the runnable count and
        # the workers' states are read microseconds apart, and a worker that starts or
        # stops spinning in between, or a kernel thread's blip, would otherwise cost the
        # next few ms of calls a thread on an idle machine. Sustained load shows in both.
        _rereads += 1
        runnable2 = _read_others(requested, &own2, True)
        if runnable2 >= 0:
            others2 = runnable2 - own2 if runnable2 > own2 else 0
            if others2 < others:
                runnable, own, others = runnable2, own2, others2
                allowed = _online - others if _online - others > 1 else 1
    _samples += 1
    _seen_runnable, _seen_own, _seen_others = runnable, own, others
    if allowed < _capacity:
        # Down when the previous reading (within the hold) agrees: another task seen in
        # one reading only is mostly a blip of a few ms (this VM: 6% of readings during a
        # training loop), and a sustained load is in the next reading 2 ms later.
        down_to = allowed
        if now - _prev_time < _hold and _prev_allowed > down_to:
            down_to = _prev_allowed
        if down_to < _capacity:
            _capacity = down_to
    elif allowed > _capacity:
        up_to = allowed
        if now - _prev_time < _hold and _prev_allowed < up_to:
            up_to = _prev_allowed
        if up_to > _capacity:
            _capacity = up_to
    _prev_time = now
    _prev_allowed = allowed
    return _capacity


cpdef int step_threads(int requested) noexcept:
    """Threads to run the next call on, when ``requested`` are configured."""
    global _last_sample, _calls, _reduced_calls, cdl_team_used, _wakes, _wake_moves
    global _last_call, _team_idle
    cdef double now, gap
    cdef int cap, asleep, moved
    cdef bint sampled = False
    if requested <= 1 or not CDL_HAVE_OPENMP:
        return requested
    if cdl_forked_child:
        return 1
    if not _adaptive:
        cdl_team_used = 1
        return requested
    now = cdl_monotonic()
    gap = now - _last_call
    _last_call = now
    if now - _last_sample >= _interval:
        _last_sample = now
        _sample(requested, now)
        sampled = True
    cap = _capacity
    _calls += 1
    if cap < requested:
        _reduced_calls += 1
        requested = cap
    if requested > 1:
        cdl_team_used = 1
        if sampled:
            asleep = _fake_asleep if _fake_read else cdl_workers_asleep(requested - 1)
            if gap < _pause:
                # back to back: workers asleep now are workers the calls do not use
                # (small calls run on one thread; a passive wait policy sleeps at once)
                _team_idle = asleep > 0
            elif asleep > 0 and _wake and not _team_idle:
                # the workers fell asleep in a pause: wake them onto CPUs of their own
                with nogil:
                    moved = cdl_wake_team(requested)
                if moved >= 0:
                    _wakes += 1
                    _wake_moves += moved
    return requested


cpdef int fork_safe_threads(int n) noexcept:
    """``n`` threads asked for explicitly (``threads=``): 1 in a child forked after the
    parent ran OpenMP teams, where a team would hang."""
    global cdl_team_used
    if n > 1 and CDL_HAVE_OPENMP:
        if cdl_forked_child:
            return 1
        cdl_team_used = 1
    return n


def forked_child():
    """Whether this process was forked after its parent ran OpenMP teams (one thread)."""
    return bool(cdl_forked_child)


cdl_register_atfork()


def set_adaptive(bint on, int online, double interval=-1.0, double hold=-1.0):
    """Turn the adaptation on or off; ``online``: the machine's CPUs; ``interval``:
    seconds between readings; ``hold``: seconds without a lower reading before the
    count goes back up (negative: unchanged)."""
    global _adaptive, _online, _interval, _hold, _capacity, _prev_time, _last_sample
    global _last_call, _team_idle
    _adaptive = on
    _last_call = -1e300
    _team_idle = False
    _online = online if online > 0 else 1
    if interval >= 0:
        _interval = interval
    if hold >= 0:
        _hold = hold
    _capacity = 1 << 30
    _prev_time = -1e300
    _last_sample = -1e300


def adaptive_state():
    """The adaptation's settings and what it last saw, as a dict."""
    return {"adaptive": bool(_adaptive), "forked_child": bool(cdl_forked_child),
            "online_cpus": _online, "interval_s": _interval,
            "hold_s": _hold,
            "capacity": None if _capacity >= (1 << 30) else _capacity,
            "runnable": _seen_runnable, "own_running": _seen_own, "others": _seen_others,
            "samples": _samples, "rereads": _rereads, "calls": _calls,
            "reduced_calls": _reduced_calls, "wake": bool(_wake), "wake_pause_s": _pause,
            "team_idle": bool(_team_idle), "wakes": _wakes, "wake_moves": _wake_moves}


def set_wake(bint on, double pause=-1.0):
    """Turn the waking of sleeping workers onto CPUs of their own on or off; ``pause``:
    seconds between two calls from which the second follows a pause (negative:
    unchanged; 5 ms by default, below libgomp's default spin of about 8 ms)."""
    global _wake, _pause
    _wake = on
    if pause >= 0:
        _pause = pause


def _set_fake_reading(int runnable, int own=-1, int confirm=-1, int asleep=0):
    """Tests: make the next readings ``runnable`` tasks, ``own`` of them cdl's (-1: real);
    ``confirm``: the runnable count a drop's confirming second reading sees (-1: the same);
    ``asleep``: how many workers they find sleeping."""
    global _fake_runnable, _fake_own, _fake_confirm, _fake_asleep
    _fake_runnable = runnable
    _fake_own = own
    _fake_confirm = confirm
    _fake_asleep = asleep


def wake_team(int n):
    """Run the wake-up region for a team of n (see cdl_wake_team); returns the workers moved."""
    global cdl_team_used
    if n > 1 and CDL_HAVE_OPENMP and not cdl_forked_child:
        cdl_team_used = 1
        return cdl_wake_team(n)
    return 0


def read_runnable():
    """The machine's runnable-task count now (field 4 of /proc/loadavg), or -1."""
    return cdl_read_runnable()


def worker_tids(int n):
    """Record and count the worker threads of this thread's OpenMP team of n."""
    global _team
    _team = n
    return cdl_collect_tids(n)


def workers_running():
    """How many recorded workers are running now (-1: gone)."""
    return cdl_workers_running()
