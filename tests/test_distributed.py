"""cdl.distributed: the gradient hook (in process), and data-parallel training under
mpiexec (subprocesses running tests/mpi_scripts/checks.py; each launch runs many
checks, see that file). Skipped, with the reason, only where mpi4py or mpiexec is
missing (pip install cdl-cpu[mpi])."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

import cdl
from cdl import distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "mpi_scripts", "checks.py")
TIMEOUT = 240


def _mpiexec():
    """[mpiexec, flags...] for n ranks on this machine, or None."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = local if os.access(local, os.X_OK) else shutil.which("mpiexec")
    if exe is None:
        return None
    cmd = [exe]
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "Open MPI" in version or "OpenRTE" in version:
        cmd.append("--oversubscribe")        # 3 ranks on 2 cores
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    # MPICH's hydra runs more ranks than cores and runs as root with no flag
    return cmd


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None, reason="MPI not available: the distributed tests need mpi4py and "
                            "mpiexec (pip install cdl-cpu[mpi])")


def launch(n, args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CDL_ISA")}
    cmd = MPIEXEC + ["-n", str(n)] + args
    # its own process group, so that a timeout ends the ranks too, not only mpiexec
    # (ranks left spinning would slow every later test)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=cwd, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.communicate()
            pytest.fail(f"mpiexec -n {n} {' '.join(args)} ran past {TIMEOUT} s")
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    assert proc.returncode == 0, (f"mpiexec -n {n} {' '.join(args)} failed "
                                  f"({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_checks(n, mode, tmp_path):
    out = tmp_path / mode
    out.mkdir(exist_ok=True)
    proc = launch(n, [sys.executable, SCRIPT, mode, str(out)])
    with open(out / f"result-{mode}.json") as f:
        return json.load(f), proc


# -- under mpiexec -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One launch of 2 ranks running every 2-rank check (shared by the tests below)."""
    return run_checks(2, "pair", tmp_path_factory.mktemp("pair"))


@needs_mpi
def test_two_ranks(pair):
    """replicas identical; bit-identical to one process summing the same shards (SGD
    with BatchNorm, AdamW with clipping, all three algorithms); a batch-64 step matched
    at rtol 1e-5; broadcasts override different seeds; a NaN (or an inf gradient) on
    one rank skips everywhere; fit with checkpoints (rank 0 writes, atomically), a NaN
    in fit, Ctrl-C on one rank, unsharded uneven data; threads per rank; fixed shards;
    each rank's own dropout masks; a summed loss refused; validation data on one rank
    only; bad arguments or a failing callback on one rank raising on every rank."""
    result, proc = pair
    assert len(result["checks"]) == 24, result
    # the progress bar came from rank 0 only
    assert proc.stderr.count("Epoch 2/2") == 1, proc.stderr


@needs_mpi
def test_one_rank_is_plain_training(tmp_path):
    result, _ = run_checks(1, "single", tmp_path)
    assert "identical_to_plain_train_step" in result["checks"]
    assert "fit_identical_to_plain_fit" in result["checks"]
    assert "one_sample_shard_refused_before_the_first_step" in result["checks"]


@needs_mpi
def test_fixed_shards_identical_on_1_2_4_ranks(tmp_path, pair):
    """shards=4: fit and train_step give the same bits (weights, BatchNorm statistics,
    every History value) on 1 process, 2 and 4 ranks."""
    results = {2: pair[0]}
    for n, mode in ((1, "single"), (4, "four")):
        if n == 1:     # one plain process, no launcher
            out = tmp_path / "plain"
            out.mkdir()
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            subprocess.run([sys.executable, SCRIPT, mode, str(out)], check=True, env=env,
                           timeout=TIMEOUT, capture_output=True)
            with open(out / f"result-{mode}.json") as f:
                results[n] = json.load(f)
        else:
            results[n] = run_checks(n, mode, tmp_path)[0]
    keys = ("shards_digest", "shards_history", "shards_last_loss")
    for n in (2, 4):
        for k in keys:
            assert results[n][k] == results[1][k], (n, k, results[n][k], results[1][k])


@needs_mpi
def test_three_ranks_run_to_run(tmp_path):
    """3 ranks (oversubscribed on 2 cores): bit-identical to one process summing the
    three shards, alltoall = allgather bit for bit, fit with a last batch smaller than
    the ranks; and two runs give the same bits."""
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(run_checks(3, "three", tmp_path / name)[0])
    first, second = runs
    assert first["digest"] == second["digest"] and first["loss"] == second["loss"]


@needs_mpi
def test_cli_train_distributed(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    proc = launch(2, [sys.executable, "-m", "cdl", "train", "--distributed", "--epochs", "2",
                      "--out", str(out)])
    assert proc.stdout.count("test accuracy:") == 1, proc.stdout
    assert "distributed: 2 ranks x 1 threads" in proc.stdout
    acc = float(proc.stdout.split("test accuracy:")[1].split("%")[0])
    assert acc > 80, proc.stdout
    assert (out / "model.npz").exists()
    model, opt = cdl.load(out / "model.npz", optimizer=True)
    assert type(opt) is cdl.SGD and opt.steps > 0


# -- in process (no MPI needed) ------------------------------------------------------------
class Recording(cdl.SGD):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []

    def gradient_hook(self, loss_value, batch_size, threads=None):
        self.calls.append((loss_value, batch_size, self.steps,
                           float(np.abs(self.model.gradient_buffer).sum())))
        return loss_value


def small(seed=0):
    return cdl.Sequential([cdl.Linear(6, 5), cdl.ReLU(), cdl.Linear(5, 3)], (6,), seed=seed)


def test_gradient_hook_between_backward_and_step():
    model = small()
    opt = Recording(model, lr=0.1)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 6)).astype(np.float32), rng.integers(0, 3, 7)
    v = model.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
    (lv, bs, steps, gsum), = opt.calls
    assert lv == v and bs == 7 and steps == 0 and gsum > 0   # after backward, before step
    assert opt.steps == 1
    x[0, 0] = np.nan                                         # called on a NaN loss too
    assert math.isnan(model.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt))
    assert len(opt.calls) == 2 and math.isnan(opt.calls[1][0]) and opt.steps == 1
    model2 = small()
    opt2 = Recording(model2, lr=0.1)
    x[0, 0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model2.fit(x, y, cdl.SoftmaxCrossEntropy(), opt2, batch_size=3, verbose=0)
    assert [c[1] for c in opt2.calls] == [3, 3, 1] and opt2.steps == 3


@pytest.mark.parametrize("make", [lambda m: cdl.SGD(m, lr=0.1), lambda m: cdl.Adam(m)])
def test_one_process_without_shards_skips_a_nonfinite_gradient(make, one_rank_comm):
    # The hook has no exchange to check the gradients in here: the step must still be
    # skipped as plain training skips it (an Inf input saturates the sigmoid: the loss
    # is finite, 0 * Inf makes a weight gradient NaN).
    m = cdl.Sequential([cdl.Linear(2, 1), cdl.Sigmoid()], (2,), seed=0)
    opt = dist.DistributedOptimizer(make(m), comm=one_rank_comm, threads=None)
    x = np.array([[np.inf, 1.0], [1.0, 1.0]], np.float32)
    y = np.array([[1.0], [0.0]], np.float32)
    before = m.parameter_buffer.copy()
    assert math.isnan(m.train_step(x, y, cdl.MSE(), opt))
    assert opt.steps == 0 and m.parameter_buffer.tobytes() == before.tobytes()
    assert m._skip_reason.startswith("a gradient was not finite")
    with pytest.warns(RuntimeWarning, match="a gradient was not finite"):
        h = m.fit(x, y, cdl.MSE(), opt, epochs=2, batch_size=2, shuffle=False, verbose=0)
    assert h.epochs == [] and opt.steps == 0
    assert m.parameter_buffer.tobytes() == before.tobytes()
    # and a finite batch steps
    assert math.isfinite(m.train_step(x[1:], y[1:], cdl.MSE(), opt)) and opt.steps == 1


def test_one_process_without_shards_runs_a_subclass_step(one_rank_comm):
    calls = []

    class Logged(dist.DistributedOptimizer):
        def step(self, threads=None):
            calls.append("step")
            super().step(threads)

    m = cdl.Sequential([cdl.Linear(2, 1)], (2,), seed=0)
    opt = Logged(cdl.SGD(m, lr=0.1), comm=one_rank_comm, threads=None)
    assert not opt.fuses_finite_check
    x, y = np.ones((2, 2), np.float32), np.zeros((2, 1), np.float32)
    assert math.isfinite(m.train_step(x, y, cdl.MSE(), opt))
    assert calls == ["step"] and opt.steps == 1


def test_hook_can_veto_the_step():
    class Veto(cdl.SGD):
        def gradient_hook(self, loss_value, batch_size, threads=None):
            return math.nan
    model = small()
    before = model.parameter_buffer.copy()
    opt = Veto(model, lr=0.1)
    x = np.ones((4, 6), np.float32)
    assert math.isnan(model.train_step(x, np.zeros(4, np.int64), cdl.SoftmaxCrossEntropy(),
                                       opt))
    assert opt.steps == 0 and np.array_equal(model.parameter_buffer, before)


def test_plain_optimizer_hook_changes_nothing():
    a, b = small(1), small(1)
    oa, ob = cdl.SGD(a, lr=0.1, momentum=0.9), cdl.SGD(b, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((9, 6)).astype(np.float32), rng.integers(0, 3, 9)
    for _ in range(3):
        v = a.train_step(x, y, cdl.SoftmaxCrossEntropy(), oa)
        g = b.compute_gradients(x, y, cdl.SoftmaxCrossEntropy())
        assert ob.gradient_hook(g, 9) == g
        ob.step()
        assert v == g
    assert np.array_equal(a.parameter_buffer, b.parameter_buffer)


def test_fit_with_comm_needs_a_distributed_optimizer():
    model = small()

    class FakeComm:
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 2
    with pytest.raises(TypeError, match="DistributedOptimizer"):
        model.fit(np.zeros((4, 6), np.float32), np.zeros(4, np.int64),
                  cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=0.1), comm=FakeComm())


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"pip install cdl-cpu\[mpi\]"):
        dist.world()


@pytest.mark.parametrize("n,bs,ranks", [(10, 4, 2), (9, 4, 2), (13, 4, 3), (1, 4, 2),
                                        (100, 7, 4), (5, 5, 1), (9, 4, 1)])
def test_global_batches_and_pieces(n, bs, ranks):
    bounds = dist.global_batches(n, bs, ranks)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    if ranks == 1:
        assert bounds == [(s, min(s + bs, n)) for s in range(0, n, bs)]
    for s, e in bounds:
        pieces = [dist.batch_piece(s, e, r, ranks) for r in range(ranks)]
        assert pieces[0][0] == s and pieces[-1][1] == e
        sizes = [b - a for a, b in pieces]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        if n >= ranks:
            assert min(sizes) >= 1


def test_global_batches_refuses_bad_sizes():
    # a batch size of 0 used to become 1 without a word
    for args, exc, match in (((5, 0, 2), ValueError, "batch_size must be >= 1, got 0"),
                             ((5, 2.5, 2), TypeError, "batch_size must be an int"),
                             ((-1, 2), ValueError, "n must be >= 0"),
                             ((5, 2, 0), ValueError, "ranks must be >= 1, got 0")):
        with pytest.raises(exc, match=rf"global_batches: {match}"):
            dist.global_batches(*args)
    for args, match in (((0, 10, 2, 2), r"rank must be in \[0, ranks=2\), got 2"),
                        ((0, 10, 0, 0), "ranks must be >= 1, got 0"),
                        ((5, 3, 0, 1), "stop must be >= 5, got 3")):
        with pytest.raises(ValueError, match=rf"batch_piece: {match}"):
            dist.batch_piece(*args)
    m = cdl.Sequential([cdl.Linear(4, 3)], (4,))
    with pytest.raises(TypeError, match=r"DistributedOptimizer: comm must be an mpi4py "
                                        r"communicator \(e.g. MPI.COMM_WORLD\), got str"):
        dist.DistributedOptimizer(cdl.SGD(m, lr=0.1), comm="world")
