"""Checks of cdl.distributed, run under mpiexec by tests/test_distributed.py.

    mpiexec -n R python checks.py MODE OUT_DIR

MODE: ``pair`` (2 ranks), ``single`` (1 rank), ``three`` (3 ranks), ``four`` (4 ranks:
fixed gradient shards only). Every rank runs
every check of its mode (the collectives need everyone); any failure prints the
traceback and aborts the whole job (MPI_Abort), so the launcher returns non-zero
at once instead of leaving a rank waiting. Rank 0 writes OUT_DIR/result-MODE.json
(what the run-to-run comparison reads) when every check passed.
"""
import copy
import hashlib
import json
import math
import os
import signal
import sys
import traceback
import warnings

import numpy as np

import cdl
from cdl import distributed as dist

comm = dist.world()
rank, size = comm.Get_rank(), comm.Get_size()
# fit leaves an ignored SIGINT ignored (a background job's); the Ctrl-C checks below send
# one to themselves, so they need Python's handler whatever the launcher left
signal.signal(signal.SIGINT, signal.default_int_handler)
LOSS = cdl.SoftmaxCrossEntropy()
DONE = []


def check(fn):
    fn()
    DONE.append(fn.__name__)
    return fn


def data(n, shape, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n,) + shape).astype(np.float32),
            rng.integers(0, classes, n).astype(np.int64))


def mlp(seed=0, l2=1e-3):
    return cdl.Sequential([cdl.Linear(12, 16), cdl.ReLU(), cdl.Linear(16, 4)], (12,),
                          seed=seed, l2=l2)


def bn_net(seed=0):
    return cdl.Sequential([cdl.Conv2d(2, 4, 3, padding=1), cdl.BatchNorm2d(4), cdl.ReLU(),
                           cdl.GlobalAvgPool2d(), cdl.Linear(4, 3)], (2, 6, 6), seed=seed,
                          l2=1e-3)


def gathered_equal(a):
    """Whether array a is bit-identical on every rank."""
    parts = comm.allgather(np.ascontiguousarray(a).tobytes())
    return all(p == parts[0] for p in parts)


def replicas_identical(model):
    return gathered_equal(model.parameter_buffer) and \
        all(gathered_equal(b) for _, b in model.buffers())


def digest(model):
    h = hashlib.sha256(model.parameter_buffer.tobytes())
    for _, b in model.buffers():
        h.update(np.ascontiguousarray(b).tobytes())
    return h.hexdigest()


def reference_sum(model, opt, pieces):
    """One process: gradients of each piece (buffers restored in between), combined as
    the DistributedOptimizer documents: Σ in rank order of m_r·g_r, divided by N (and
    the same for the float buffers); then the wrapped optimizer's step."""
    snap = [b.copy() for _, b in model.buffers()]
    grads, bufs, losses, counts = [], [], [], []
    for xs, ys in pieces:
        for (_, b), s in zip(model.buffers(), snap):
            b[...] = s
        losses.append(model.compute_gradients(xs, ys, LOSS))
        grads.append(model.gradient_buffer.copy())
        bufs.append([b.copy() for _, b in model.buffers()])
        counts.append(len(xs))
    f32 = model.dtype.type
    scaled = [np.multiply(g, f32(m)) for g, m in zip(grads, counts)]
    acc = np.add(scaled[0], scaled[1]) if len(scaled) > 1 else scaled[0].copy()
    for s in scaled[2:]:
        np.add(acc, s, out=acc)
    N = sum(counts)
    model.gradient_buffer[...] = np.divide(acc, f32(N))
    for k, (_, b) in enumerate(model.buffers()):
        if b.dtype == model.dtype:
            parts = [np.multiply(bb[k], f32(m)) for bb, m in zip(bufs, counts)]
            a = np.add(parts[0], parts[1]) if len(parts) > 1 else parts[0].copy()
            for p in parts[2:]:
                np.add(a, p, out=a)
            b[...] = np.divide(a, f32(N))
        else:
            b[...] = np.max([bb[k] for bb in bufs], axis=0)
    opt.step()
    loss = 0.0
    for v, m in zip(losses, counts):
        loss += v * m
    return loss / N


def pieces_of(x, y, ranks):
    out = []
    for r in range(ranks):
        lo, hi = dist.batch_piece(0, len(x), r, ranks)
        out.append((x[lo:hi], y[lo:hi]))
    return out


# -- checks shared by every mode ----------------------------------------------------------
def threads_per_rank():
    # set when the first DistributedOptimizer is made (OMP_NUM_THREADS is unset here)
    dist.DistributedOptimizer(cdl.SGD(mlp(), lr=0.1))
    assert dist.threads_per_rank() == cdl.get_num_threads()
    usable = cdl._config.usable_cores()
    local = comm.Split_type(dist._mpi().COMM_TYPE_SHARED)
    expect = max(1, usable // local.Get_size())
    local.Free()
    assert cdl.get_num_threads() == expect, (cdl.get_num_threads(), expect)


def bit_identical_to_one_process_sum(make=bn_net, shape=(2, 6, 6), opt_cls=cdl.SGD,
                                     algorithm="auto", steps=3, **opt_kw):
    opt_kw = opt_kw or {"lr": 0.1, "momentum": 0.9}
    model = make(seed=0)
    opt = dist.DistributedOptimizer(opt_cls(model, **opt_kw), algorithm=algorithm)
    ref = copy.deepcopy(model)
    ref_opt = opt_cls(ref, **opt_kw)
    for t in range(steps):
        x, y = data(24 + size - 1, shape, 3, seed=t)     # uneven pieces on 2 ranks
        p = pieces_of(x, y, size)
        v = model.train_step(p[rank][0], p[rank][1], LOSS, opt)
        rv = reference_sum(ref, ref_opt, p)
        assert v == rv, (t, v, rv)
        assert np.array_equal(model.parameter_buffer, ref.parameter_buffer), t
        for (_, a), (_, b) in zip(model.buffers(), ref.buffers()):
            assert np.array_equal(a, b), t
    assert replicas_identical(model)
    assert opt.steps == steps
    return model


def shards_run(S=4):
    """fit (with validation, a last partial batch, BatchNorm, L2, momentum) and then two
    train_steps with fixed gradient shards: the digest and History must not depend on
    the number of ranks (compared across launches by the pytest side)."""
    model = bn_net(seed=0)
    opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1, momentum=0.9), shards=S)
    x, y = data(45, (2, 6, 6), 3, seed=13)
    h = model.fit(x, y, LOSS, opt, epochs=2, batch_size=16, validation_split=0.1, verbose=0)
    assert h.stop_reason is None
    for t in range(2):
        xb, yb = data(19, (2, 6, 6), 3, seed=30 + t)
        lo, hi = opt.piece(0, 19)
        v = model.train_step(xb[lo:hi], yb[lo:hi], LOSS, opt)
        assert math.isfinite(v)
    assert replicas_identical(model)
    logs = {k: v for k, v in h.history.items() if k != "seconds"}
    return {"shards_digest": digest(model), "shards_history": logs, "shards_last_loss": v}


# -- pair (2 ranks) ---------------------------------------------------------------------------
def pair_checks():
    check(threads_per_rank)

    @check
    def sum_of_shards_sgd_bn():
        bit_identical_to_one_process_sum()

    @check
    def sum_of_shards_adamw_clip():
        bit_identical_to_one_process_sum(make=lambda seed: mlp(seed), shape=(12,),
                                         opt_cls=cdl.AdamW, lr=1e-2, clip_grad_norm=0.5)

    @check
    def alltoall_and_allreduce():
        a = bit_identical_to_one_process_sum(algorithm="alltoall")
        b = bit_identical_to_one_process_sum(algorithm="allgather")
        assert np.array_equal(a.parameter_buffer, b.parameter_buffer)
        # MPI's Allreduce on 2 ranks adds the same two numbers: the same bits here too
        c = bit_identical_to_one_process_sum(algorithm="allreduce")
        assert np.allclose(c.parameter_buffer, a.parameter_buffer, rtol=1e-6, atol=1e-7)

    @check
    def matches_single_batch64_step():
        model = mlp(seed=0)
        ref = copy.deepcopy(model)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1, momentum=0.9))
        ref_opt = cdl.SGD(ref, lr=0.1, momentum=0.9)
        for t in range(3):
            x, y = data(64, (12,), seed=10 + t)
            xs, ys = dist.shard(x, y)
            v = model.train_step(xs, ys, LOSS, opt)
            rv = ref.train_step(x, y, LOSS, ref_opt)
            g, rg = model.gradient_buffer, ref.gradient_buffer
            assert np.allclose(g, rg, rtol=1e-5, atol=1e-6 * np.abs(rg).max()), t
            assert math.isclose(v, rv, rel_tol=1e-6), (v, rv)
            assert np.allclose(model.parameter_buffer, ref.parameter_buffer, rtol=1e-5,
                               atol=1e-6), t
        assert replicas_identical(model)

    @check
    def broadcast_overrides_seeds():
        model = mlp(seed=100 + rank)                    # different weights per rank
        opt = cdl.SGD(model, lr=0.05, momentum=0.9)
        x, y = data(8, (12,), seed=rank)
        model.train_step(x, y, LOSS, opt)               # different momentum per rank
        assert not gathered_equal(model.parameter_buffer)
        dist.broadcast_parameters(model)
        dist.broadcast_optimizer_state(opt)
        assert replicas_identical(model) and gathered_equal(opt.buffers["momentum_buffer"])
        dopt = dist.DistributedOptimizer(opt)
        for t in range(2):
            x, y = data(16, (12,), seed=20 + t)
            model.train_step(*dist.shard(x, y), LOSS, dopt)
        assert replicas_identical(model)
        net = bn_net(seed=rank)
        dist.broadcast_parameters(net)
        assert replicas_identical(net)

    @check
    def nan_on_one_rank_skips_everywhere():
        model = bn_net(seed=0)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1, momentum=0.9))
        x, y = data(16, (2, 6, 6), 3, seed=3)
        xs, ys = dist.shard(x, y)
        assert math.isfinite(model.train_step(xs, ys, LOSS, opt))
        before = model.parameter_buffer.copy()
        bad = xs.copy()
        if rank == 1:
            bad[0, 0, 0, 0] = np.nan
        v = model.train_step(bad, ys, LOSS, opt)
        assert math.isnan(v) and opt.steps == 1, (v, opt.steps)
        assert np.array_equal(model.parameter_buffer, before)
        assert "loss was not finite" in opt.last_skip
        assert math.isfinite(model.train_step(xs, ys, LOSS, opt)) and opt.steps == 2
        assert replicas_identical(model)

        class Poison(dist.DistributedOptimizer):        # a finite loss, an inf gradient
            def gradient_hook(self, loss_value, batch_size, threads=None):
                if rank == 1:
                    self.model.gradient_buffer[3] = np.inf
                return super().gradient_hook(loss_value, batch_size, threads)
        m2 = mlp(seed=0)
        p = Poison(cdl.SGD(m2, lr=0.1))
        before = m2.parameter_buffer.copy()
        x, y = data(16, (12,), seed=4)
        assert math.isnan(m2.train_step(*dist.shard(x, y), LOSS, p))
        assert np.array_equal(m2.parameter_buffer, before) and p.steps == 0
        assert "gradient was not finite" in p.last_skip

    @check
    def fit_and_checkpoints():
        out = sys.argv[2]
        model = mlp(seed=0)
        ref = copy.deepcopy(model)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.05, momentum=0.9))
        x, y = data(103, (12,), seed=7)                 # 82 train (last batch: 2), 21 val
        ck = cdl.ModelCheckpoint(os.path.join(out, "ckpt-{epoch}.npz"), save_optimizer=True)
        h = model.fit(x, y, LOSS, opt, epochs=2, batch_size=20, validation_split=0.2,
                      callbacks=[ck, cdl.CosineLR(2)], verbose=1)
        assert h.stop_reason is None and len(h.epochs) == 2
        assert replicas_identical(model)
        logs = {k: v for k, v in h.history.items() if k != "seconds"}
        assert all(l == logs for l in comm.allgather(logs)), "History differs between ranks"
        assert ck.saved == [os.path.join(out, f"ckpt-{e}.npz") for e in (1, 2)]
        comm.Barrier()
        files = sorted(os.listdir(out))
        assert [f for f in files if f.startswith("ckpt")] == ["ckpt-1.npz", "ckpt-2.npz"], files
        assert not [f for f in files if f.endswith(".tmp")], files
        back, bopt = cdl.load(os.path.join(out, "ckpt-2.npz"), optimizer=True)
        assert np.array_equal(back.parameter_buffer, model.parameter_buffer)
        assert bopt.steps == opt.steps == 2 * 5 and type(bopt) is cdl.SGD
        # the same run in one process, batch 20: close, not bit-identical
        rh = ref.fit(x, y, LOSS, cdl.SGD(ref, lr=0.05, momentum=0.9), epochs=2, batch_size=20,
                     validation_split=0.2, callbacks=[cdl.CosineLR(2)], verbose=0)
        for k in ("loss", "val_loss"):
            assert np.allclose(h[k], rh[k], rtol=1e-4), (k, h[k], rh[k])
        assert h["accuracy"] == rh["accuracy"] and h["val_accuracy"] == rh["val_accuracy"]

    @check
    def fit_stops_everywhere_on_nan():
        model = mlp(seed=0)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.05))
        x, y = data(40, (12,), seed=8)
        x[30] = np.inf                                  # in one rank's piece of a batch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h = model.fit(x, y, LOSS, opt, epochs=3, batch_size=8, shuffle=False, verbose=0)
        assert h.stop_reason and "every rank" in h.stop_reason, h.stop_reason
        assert "epoch 1, step 4 of 5" in h.stop_reason, h.stop_reason
        # the same message on every rank, naming the cause, whichever rank holds the inf
        assert "NaN or Inf inputs" in h.stop_reason and gathered_equal(h.stop_reason)
        # the warning from rank 0 only (every rank has it in stop_reason)
        assert any("every rank" in str(w.message) for w in caught) == (rank == 0)
        assert opt.steps == 3 and replicas_identical(model)

    @check
    def ctrl_c_on_one_rank_stops_all():
        import signal

        class Interrupt(cdl.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == 1 and rank == 1:
                    os.kill(os.getpid(), signal.SIGINT)     # fit's handler takes it
        model = mlp(seed=0)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.05))
        x, y = data(40, (12,), seed=8)
        h = model.fit(x, y, LOSS, opt, epochs=3, batch_size=8, callbacks=[Interrupt()],
                      verbose=0)
        assert h.stop_reason and "interrupted" in h.stop_reason, h.stop_reason
        assert "epoch 2, step 1 of 5" in h.stop_reason, h.stop_reason
        assert len(h.epochs) == 1 and opt.steps == 6 and replicas_identical(model)

    @check
    def ctrl_c_during_a_step_stops_all_after_the_same_step():
        # before the step's exchange (it was dropped) and after it (one rank left alone)
        import signal
        for before in (True, False):
            class Hooked(dist.DistributedOptimizer):
                def gradient_hook(self, loss_value, batch_size, threads=None):
                    kill = rank == 1 and self.steps == 2
                    if kill and before:
                        os.kill(os.getpid(), signal.SIGINT)
                    value = super().gradient_hook(loss_value, batch_size, threads)
                    if kill and not before:
                        os.kill(os.getpid(), signal.SIGINT)
                    return value
            model = mlp(seed=0)
            opt = Hooked(cdl.SGD(model, lr=0.05))
            x, y = data(40, (12,), seed=8)
            h = model.fit(x, y, LOSS, opt, epochs=2, batch_size=8, verbose=0)
            assert h.stop_reason and "epoch 1, step 4 of 5" in h.stop_reason, h.stop_reason
            assert opt.steps == 4 and replicas_identical(model)

    @check
    def fit_names_a_nonfinite_gradient_with_a_finite_loss():
        # an Inf input behind a saturated sigmoid: the loss is finite, the gradient is not
        x, y = data(16, (4,), 2, seed=3)
        x[0, 0] = np.inf
        m = cdl.Sequential([cdl.Linear(4, 3), cdl.Sigmoid(), cdl.Linear(3, 2)], (4,), seed=0)
        opt = dist.DistributedOptimizer(cdl.SGD(m, lr=0.01))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = m.fit(x, y, LOSS, opt, epochs=1, batch_size=8, shuffle=False, verbose=0)
        assert h.stop_reason.startswith("fit: a gradient was not finite at epoch 1, step 1"), \
            h.stop_reason
        assert "the averaged gradient was not finite (the global loss was " in h.stop_reason
        assert gathered_equal(h.stop_reason) and np.isfinite(m.parameter_buffer).all()

    @check
    def a_stop_or_failure_on_one_rank_is_everyones():
        class StopOne(cdl.Callback):         # a time budget read on one rank, say
            def on_epoch_end(self, epoch, logs=None):
                if rank == 1:
                    self.model.stop_training = True
        model = mlp(seed=0)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.05))
        x, y = data(40, (12,), seed=8)
        h = model.fit(x, y, LOSS, opt, epochs=3, batch_size=8, callbacks=[StopOne()],
                      verbose=0)
        assert h.epochs == [0] and opt.steps == 5
        for hook in ("on_train_begin", "on_epoch_begin"):
            class FailOne(cdl.Callback):
                pass

            def fail(self, *args, **kwargs):
                if rank == 1:
                    raise OSError("disk full")
            setattr(FailOne, hook, fail)
            try:
                model.fit(x, y, LOSS, opt, epochs=1, batch_size=8, callbacks=[FailOne()],
                          verbose=0)
            except (OSError, RuntimeError) as exc:
                assert "disk full" in str(exc), exc
            else:
                raise AssertionError(f"{hook} failing on rank 1 was not raised on rank {rank}")
        try:      # a setting that differs between ranks
            model.fit(x, y, LOSS, opt, epochs=2 + rank, batch_size=8, verbose=0)
        except ValueError as exc:
            assert "epochs must be the same on every rank" in str(exc), exc
        else:
            raise AssertionError("different epochs were not refused")

    @check
    def replicas_that_differ_are_refused_on_every_rank():
        # an optimizer setting, a schedule, the weights, the architecture, the validation
        # data or an argument check failing on one rank: they trained apart silently (or
        # one rank raised and the others waited)
        x, y = data(40, (12,), seed=8)

        def refused(make, *, callbacks=(), vd=None, loss=LOSS, expect):
            model, opt = make()
            try:
                model.fit(x, y, loss, opt, epochs=1, batch_size=8, verbose=0,
                          callbacks=list(callbacks), validation_data=vd)
            except (ValueError, TypeError) as exc:
                assert expect in str(exc), exc
            else:
                raise AssertionError(f"not refused on rank {rank}: {expect}")

        def plain(lr=0.05, seed=0, hidden=16):
            model = mlp(seed=seed) if hidden == 16 else cdl.Sequential(
                [cdl.Linear(12, hidden), cdl.ReLU(), cdl.Linear(hidden, 4)], (12,), seed=seed)
            return model, dist.DistributedOptimizer(cdl.SGD(model, lr=lr))
        refused(lambda: plain(lr=0.05 * (1 + rank)), expect="the optimizer's settings")
        refused(plain, callbacks=[cdl.CosineLR(3)] if rank == 0 else [],
                expect="the learning-rate schedules")
        refused(lambda: plain(seed=rank), expect="the model's weights and buffers")
        refused(lambda: plain(hidden=16 + rank), expect="the model (architecture")
        refused(plain, vd=(x[:10 + rank], y[:10 + rank]), expect="the validation data's size")
        refused(plain, loss=cdl.SoftmaxCrossEntropy(reduction="sum" if rank else "mean"),
                expect="reduction='mean'")

        class Noted(cdl.CosineLR):          # the same on both ranks: a NaN attribute too
            last_seen = math.nan

            def on_train_begin(self, logs=None):
                super().on_train_begin(logs)
                self.last_seen = math.nan
        model, opt = plain()
        noted = Noted(2)
        for _ in range(2):                  # the second fit sees last_seen = nan
            model.fit(x, y, LOSS, opt, epochs=1, batch_size=8, verbose=0, callbacks=[noted])
        assert replicas_identical(model)

    @check
    def shards_with_an_empty_first_step():
        # a global batch smaller than shards: a rank's first piece is empty (it raised
        # there, and the other rank waited)
        x, y = data(9, (12,), seed=5)
        model = mlp(seed=0)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1), shards=2)
        h = model.fit(x, y, LOSS, opt, epochs=1, batch_size=1, verbose=0)
        assert math.isfinite(h.history["loss"][0]) and replicas_identical(model)

    @check
    def fit_unsharded_uneven():
        model = bn_net(seed=0)
        opt = dist.DistributedOptimizer(cdl.Adam(model, lr=1e-2))
        x, y = data(41, (2, 6, 6), 3, seed=9)
        xs, ys = dist.shard(x, y)                       # 21 and 20 samples
        h = model.fit(xs, ys, LOSS, opt, epochs=2, batch_size=8, shard=False,
                      validation_data=dist.shard(*data(10, (2, 6, 6), 3, seed=1)), verbose=0)
        assert h.stop_reason is None and opt.steps == 2 * 6, opt.steps   # rank 1: one empty
        assert replicas_identical(model)
        assert all(math.isfinite(v) for v in h["loss"] + h["val_loss"])

    @check
    def compute_gradients_then_step():
        # a hand-written loop: compute_gradients, then step() averages (equal weights)
        model = mlp(seed=0)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1))
        x, y = data(32, (12,), seed=11)
        model.compute_gradients(*dist.shard(x, y), LOSS)
        opt.step()
        assert opt.steps == 1 and replicas_identical(model)

    @check
    def dropout_masks_differ_across_ranks():
        def make():
            return cdl.Sequential([cdl.Linear(12, 64), cdl.ReLU(), cdl.Dropout(0.5),
                                   cdl.Linear(64, 4)], (12,), seed=4)
        model, alone = make(), make()
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1))
        x, _ = data(8, (12,), seed=12)
        outs = comm.allgather(model.forward(x).copy())       # training mode: dropout on
        assert not np.array_equal(outs[0], outs[1])
        assert np.array_equal(outs[0], alone.forward(x))      # rank 0 = one process
        x, y = data(16, (12,), seed=13)
        model.train_step(*dist.shard(x, y), LOSS, opt)    # replicas stay identical
        assert replicas_identical(model)

    @check
    def summed_loss_refused():
        model = mlp(seed=0)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1))
        x, y = data(8, (12,), seed=14)
        before = model.parameter_buffer.copy()
        try:
            model.train_step(x, y, cdl.SoftmaxCrossEntropy(reduction="sum"), opt)
        except ValueError as e:
            assert "reduction='mean'" in str(e), e
        else:
            raise AssertionError("a summed loss was accepted")
        assert np.array_equal(before, model.parameter_buffer) and opt.steps == 0

    @check
    def sampler_same_steps():
        s = dist.DistributedSampler(53, 16, seed=5)
        idx = [i for e in range(2) for i in s.epoch(e)]
        assert len(s) == 4 and comm.allgather(len(idx)) == [8, 8]
        got = comm.allgather([i.tolist() for i in s.epoch(1)])
        flat = sorted(v for r in got for b in r for v in b)
        assert flat == list(range(53))

    @check
    def validation_on_some_ranks_only():
        # shard=False: rank 1's part of the validation set is empty; every rank still
        # joins the scoring (it used to abort in a mismatched allgather)
        model = mlp(seed=6)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1))
        x, y = data(32, (12,), seed=15)
        xv, yv = data(1, (12,), seed=16)
        part = (xv, yv) if rank == 0 else (xv[:0], yv[:0])
        h = model.fit(*dist.shard(x, y), LOSS, opt, epochs=2, batch_size=8, shard=False,
                      validation_data=part, verbose=0)
        assert len(h["val_loss"]) == 2 and gathered_equal(np.array(h["val_loss"]))

    @check
    def bad_arguments_on_one_rank_raise_on_every_rank():
        model = mlp(seed=7)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1))
        x, y = dist.shard(*data(16, (12,), seed=17))
        if rank == 1:
            y = y.copy()
            y[0] = 9                                  # 4 classes
        try:
            model.fit(x, y, LOSS, opt, epochs=1, batch_size=8, shard=False, verbose=0)
        except ValueError as e:
            assert rank == 1 or "rank 1 refused its arguments" in str(e), e
        else:
            raise AssertionError("a bad label on rank 1 was accepted")
        assert opt.steps == 0

    @check
    def a_callback_failing_on_one_rank_stops_every_rank():
        model = mlp(seed=8)
        opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.1))
        x, y = data(16, (12,), seed=18)

        class FailOnRank0(cdl.Callback):             # as a checkpoint on a full disk
            def on_epoch_end(self, epoch, logs=None):
                if self.rank == 0:
                    raise OSError("no space left on device")
        try:
            model.fit(x, y, LOSS, opt, epochs=3, batch_size=8, callbacks=[FailOnRank0()],
                      verbose=0)
        except (OSError, RuntimeError) as e:
            assert isinstance(e, OSError) if rank == 0 else \
                "a callback on rank 0 failed (OSError: no space left" in str(e), e
        else:
            raise AssertionError("the failing callback did not stop fit")
        assert opt.steps == 2                         # one epoch of 16 / 8

    result = shards_run()
    DONE.append("shards")
    return result


def single_checks():
    check(threads_per_rank)

    @check
    def identical_to_plain_train_step():
        for make, shape in ((mlp, (12,)), (bn_net, (2, 6, 6))):
            a, b = make(seed=1), make(seed=1)
            oa = dist.DistributedOptimizer(cdl.SGD(a, lr=0.1, momentum=0.9))
            ob = cdl.SGD(b, lr=0.1, momentum=0.9)
            for t in range(4):
                x, y = data(16 + t, shape, 3, seed=t)
                assert a.train_step(x, y, LOSS, oa) == b.train_step(x, y, LOSS, ob)
            assert np.array_equal(a.parameter_buffer, b.parameter_buffer)
            assert digest(a) == digest(b)

    @check
    def fit_identical_to_plain_fit():
        a, b = mlp(seed=2), mlp(seed=2)
        x, y = data(50, (12,), seed=3)
        kw = dict(epochs=2, batch_size=16, validation_split=0.2, verbose=0)
        ha = a.fit(x, y, LOSS, dist.DistributedOptimizer(cdl.SGD(a, lr=0.05)), **kw)
        hb = b.fit(x, y, LOSS, cdl.SGD(b, lr=0.05), **kw)
        strip = lambda h: {k: v for k, v in h.history.items() if k != "seconds"}  # noqa
        assert strip(ha) == strip(hb), (strip(ha), strip(hb))
        assert np.array_equal(a.parameter_buffer, b.parameter_buffer)

    @check
    def one_sample_shard_refused_before_the_first_step():
        # batches of 6 cut into 4 gradient shards: 2, 2, 1, 1 samples; BatchNorm1d cannot
        # train on one, which fit says before it trains (it failed mid-epoch)
        m = cdl.Sequential([cdl.Linear(12, 8), cdl.BatchNorm1d(8), cdl.ReLU(),
                            cdl.Linear(8, 3)], (12,), seed=4)
        x, y = data(16, (12,), 3, seed=5)
        before = m.parameter_buffer.copy()
        opt = dist.DistributedOptimizer(cdl.SGD(m, lr=0.1), shards=4)
        try:
            m.fit(x, y, LOSS, opt, batch_size=6, verbose=0)
        except ValueError as exc:
            assert "gradient shard of shards=4" in str(exc) and " of 1, " in str(exc), exc
        else:
            raise AssertionError("fit trained on one-sample shards")
        assert np.array_equal(m.parameter_buffer, before)
        m.fit(x, y, LOSS, opt, batch_size=8, verbose=0)     # shards of 2 train

    result = shards_run()
    DONE.append("shards")
    return result


def four_checks():
    result = shards_run()
    DONE.append("shards")
    with_bad = False
    try:
        dist.DistributedOptimizer(cdl.SGD(mlp(), lr=0.1), shards=6)   # 4 does not divide 6
    except ValueError:
        with_bad = True
    assert with_bad
    DONE.append("shards_checked")
    return result


def three_checks():
    check(threads_per_rank)

    @check
    def sum_of_shards_three():
        bit_identical_to_one_process_sum()

    @check
    def alltoall_same_bits():
        a = bit_identical_to_one_process_sum(algorithm="alltoall")
        b = bit_identical_to_one_process_sum(algorithm="allgather")
        assert np.array_equal(a.parameter_buffer, b.parameter_buffer)

    model = bn_net(seed=4)
    opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.05, momentum=0.9))
    x, y = data(61, (2, 6, 6), 3, seed=12)
    h = model.fit(x, y, LOSS, opt, epochs=2, batch_size=10, verbose=0)   # last batch 1 < 3
    assert h.stop_reason is None and opt.steps == 2 * 6
    assert replicas_identical(model)
    DONE.append("fit_three")
    return {"digest": digest(model), "loss": h["loss"]}


def main():
    mode, out = sys.argv[1], sys.argv[2]
    result = {"pair": pair_checks, "single": single_checks, "three": three_checks,
              "four": four_checks}[mode]()
    comm.Barrier()
    if rank == 0:
        result.update(mode=mode, ranks=size, checks=DONE)
        with open(os.path.join(out, f"result-{mode}.json"), "w") as f:
            json.dump(result, f)
        print(f"{mode}: {len(DONE)} checks passed on {size} rank(s): {', '.join(DONE)}")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        sys.stdout.flush()
        sys.stderr.write(f"rank {rank} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        comm.Abort(1)
