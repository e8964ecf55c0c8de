"""Data-parallel training over MPI: a thin layer over mpi4py.

Every rank (process) holds a full replica of the model and trains on its shard
of each global batch; the gradients are averaged over the global sample count
before every update, so the replicas stay bit-identical. Launch with any MPI
launcher, e.g. ``mpiexec -n 2 python train.py`` (``pip install cdl-cpu[mpi]``
brings mpi4py and the MPICH wheel, which has ``mpiexec``; mpi4py also runs on
any other MPI it was built against)::

    from cdl import distributed as dist
    opt = dist.DistributedOptimizer(cdl.SGD(model, lr=0.05))   # threads per rank set here
    dist.broadcast_parameters(model)                  # rank 0's weights everywhere
    model.fit(x, y, loss, opt, batch_size=64)         # the same full x, y on every rank

- ``DistributedOptimizer(optimizer, comm=None)`` wraps any cdl optimizer. Its
  :meth:`~DistributedOptimizer.gradient_hook` (which ``train_step`` and ``fit``
  call between the backward pass and the update) sends Σ-form gradients
  (each rank's mean gradient times its sample count) and the layers' float
  buffers (BatchNorm running statistics) in one message, adds them in rank
  order and divides by the global sample count. The order of the additions is
  fixed by cdl, not by the MPI library, so a run is bit-identical from run to
  run on any MPI (``algorithm="allreduce"`` trades this for MPI's Allreduce).
  The loss value, the sample count and the flags travel in the same message:
  a non-finite loss or gradient on any rank makes every rank skip the step
  (the hook returns NaN everywhere), so no rank is left waiting in a
  collective.
- ``broadcast_parameters(model)`` / ``broadcast_optimizer_state(opt)`` copy
  rank 0's state to every rank (start from the same weights whatever the seeds).
- ``shard(x, y)`` gives a rank its contiguous block; ``DistributedSampler``
  deals each global batch to the ranks so that every rank runs the same number
  of steps per epoch, last partial batch included, shuffled from a seed.
- ``threads_per_rank(comm)``: the usable cores divided by the ranks on the node
  (MPI launchers such as MPICH's do not bind ranks to cores; two ranks with two
  threads each on two cores ran an MLP step 150x slower).

- ``DistributedOptimizer(..., shards=S)``: fixed gradient shards summed over a
  fixed tree, so training is bit-identical on 1, 2, 4, … S ranks.

One rank (``mpiexec -n 1`` or a plain ``python``) trains exactly as without
this module: the hook returns the local loss and sends nothing (unless
``shards`` is given).
"""
import math
import os

import numpy as np

from . import _config
from .functional._checks import int_at_least
from .optim.base import fuses_finite_check as _fuses_finite_check

__all__ = ["DistributedOptimizer", "DistributedSampler", "broadcast_parameters",
           "broadcast_optimizer_state", "shard", "global_batches", "batch_piece",
           "threads_per_rank", "tree_blocks", "world", "ALGORITHMS"]

INSTALL_HINT = "pip install cdl-cpu[mpi]"
ALGORITHMS = ("auto", "allgather", "alltoall", "allreduce")

_LOSS_NONFINITE, _STOP = 1, 2


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"cdl.distributed needs mpi4py and an MPI library: {INSTALL_HINT} "
                          f"(mpi4py and the mpich wheel, which brings mpiexec), or "
                          f"pip install mpi4py for an MPI you already have ({exc})") from exc
    return MPI


def world():
    """mpi4py's ``MPI.COMM_WORLD`` (imports mpi4py; a clear ImportError without it)."""
    return _mpi().COMM_WORLD


def _comm(comm, where="cdl.distributed"):
    if comm is None:
        return world()
    if not all(callable(getattr(comm, a, None)) for a in ("Get_rank", "Get_size", "allgather")):
        raise TypeError(f"{where}: comm must be an mpi4py communicator (e.g. "
                        f"MPI.COMM_WORLD), got {type(comm).__name__}")
    return comm


def _aligned(nbytes):
    raw = np.zeros(nbytes + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + nbytes]


# -- threads ------------------------------------------------------------------------
def threads_per_rank(comm=None):
    """Threads for each rank: the usable cores (affinity and cgroup quota) divided by
    the ranks on this node (``comm.Split_type(COMM_TYPE_SHARED)``), at least 1.

    A launcher that binds ranks to their own cores (different affinities) already
    gave each rank its share: then each rank uses its own usable cores. Collective:
    every rank of ``comm`` must call it."""
    MPI = _mpi()
    comm = _comm(comm)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        sets = node.allgather(mine)
        usable = _config.usable_cores()
        if all(s == sets[0] for s in sets):
            return max(1, usable // node.Get_size())
        return usable
    finally:
        node.Free()


# -- data ---------------------------------------------------------------------------
def global_batches(n, batch_size, ranks=1):
    """(start, stop) of each global batch over n samples: batches of ``batch_size``,
    the last partial one kept. A last batch with fewer samples than ``ranks`` joins
    the one before it, so that it leaves no rank an empty piece where the others have
    batch_size / ranks (a batch_size below ``ranks``, or n below it, does leave some
    ranks empty pieces)."""
    n = int_at_least(n, "n", "global_batches", 0)
    bs = int_at_least(batch_size, "batch_size", "global_batches", 1)
    ranks = int_at_least(ranks, "ranks", "global_batches", 1)
    bounds = [(s, min(s + bs, n)) for s in range(0, n, bs)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < ranks:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def batch_piece(start, stop, rank, ranks):
    """The contiguous piece [lo, hi) of the global batch [start, stop) that ``rank`` of
    ``ranks`` trains on: sizes differ by at most one, the larger pieces first."""
    where = "batch_piece"
    ranks = int_at_least(ranks, "ranks", where, 1)
    rank = int_at_least(rank, "rank", where, 0)
    start = int_at_least(start, "start", where, 0)
    stop = int_at_least(stop, "stop", where, start)
    if rank >= ranks:
        raise ValueError(f"{where}: rank must be in [0, ranks={ranks}), got {rank}")
    q, r = divmod(stop - start, ranks)
    lo = start + rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def shard(x, y=None, comm=None):
    """This rank's contiguous block of (x, y) (views; sizes differ by at most one).

    For ``fit(..., shard=False)`` or your own loop. ``fit`` given the full data on
    every rank shards each global batch itself (``shard=True``)."""
    comm = _comm(comm)
    lo, hi = batch_piece(0, len(x), comm.Get_rank(), comm.Get_size())
    return x[lo:hi] if y is None else (x[lo:hi], y[lo:hi])


class DistributedSampler:
    """Each rank's sample indices, step by step: ``for idx in sampler.epoch(e)``.

    Every rank gets the same number of steps per epoch (``len(sampler)``), the last
    partial batch included; each global batch of ``batch_size`` is dealt to the
    ranks in contiguous pieces (``batch_piece``). With ``shuffle`` the order of
    epoch e is ``np.random.default_rng([seed, e]).permutation(n)``: reproducible
    from the seed, the same on every rank, whatever the number of ranks.
    """

    def __init__(self, n, batch_size, comm=None, seed=0, shuffle=True):
        comm = _comm(comm)
        self.n = int_at_least(n, "n", "DistributedSampler", 0)
        self.batch_size = int_at_least(batch_size, "batch_size", "DistributedSampler", 1)
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.ranks = comm.Get_rank(), comm.Get_size()
        self.bounds = global_batches(self.n, self.batch_size, self.ranks)

    def __len__(self):
        return len(self.bounds)

    def epoch(self, e=0):
        order = np.random.default_rng([self.seed, e]).permutation(self.n) if self.shuffle \
            else np.arange(self.n)
        for s, t in self.bounds:
            lo, hi = batch_piece(s, t, self.rank, self.ranks)
            yield order[lo:hi]


# -- broadcasts -----------------------------------------------------------------------
def broadcast_parameters(model, root=0, comm=None):
    """Copy rank ``root``'s parameters and buffers (BatchNorm statistics) to every rank,
    in place (one Bcast of the flat ``parameter_buffer``, one per buffer)."""
    comm = _comm(comm)
    if model.parameter_buffer is not None:
        comm.Bcast(model.parameter_buffer, root=root)
    for _, buf in model.buffers():
        if buf.flags.c_contiguous:
            comm.Bcast(buf, root=root)
        else:
            tmp = np.ascontiguousarray(buf)
            comm.Bcast(tmp, root=root)
            buf[...] = tmp


def broadcast_optimizer_state(optimizer, root=0, comm=None):
    """Copy rank ``root``'s optimizer state to every rank: the flat state ``buffers``
    (momentum, Adam's moments), the step count and the learning rates."""
    if isinstance(optimizer, DistributedOptimizer):
        comm = optimizer.comm if comm is None else comm
        optimizer = optimizer.optimizer
    comm = _comm(comm)
    for name in sorted(optimizer.buffers):
        comm.Bcast(optimizer.buffers[name], root=root)
    steps, lr, base_lr = comm.bcast((optimizer.steps, optimizer.lr, optimizer.base_lr),
                                    root=root)
    optimizer.steps, optimizer.lr, optimizer.base_lr = steps, lr, base_lr


# -- the exchange ---------------------------------------------------------------------
class _Exchange:
    """The per-step message and its reduction.

    Message of one rank: a meta block (float64 loss sum, int64 count, int64 flags,
    the int64 buffers) then the data: m·gradients followed by m·(float buffers), in
    the model's dtype. Reduced data = Σ over ranks in rank order, divided by N = Σ m.
    ``allgather``: every rank gets every message and adds them all. ``alltoall``: the
    data is cut in as many chunks as ranks, each rank adds one chunk (every chunk
    carries the sender's meta block) and an Allgather of the sums completes it; the
    same additions in the same order, so both give the same bits.
    """

    def __init__(self, comm, model, algorithm):
        self.comm = comm
        self.R = R = comm.Get_size()
        self.rank = comm.Get_rank()
        self.dtype = dt = model.dtype
        grads = model.gradient_buffer
        self.float_bufs = [b for _, b in model.buffers() if b.dtype == dt]
        self.int_bufs = [b for _, b in model.buffers() if b.dtype.kind in "iu"]
        self.sources = ([grads] if grads is not None else []) + \
            [b.reshape(-1) if b.flags.c_contiguous else None for b in self.float_bufs]
        if any(s is None for s in self.sources):
            raise ValueError("DistributedOptimizer: a model buffer is not contiguous")
        self.P = 0 if grads is None else grads.size
        self.D = sum(s.size for s in self.sources)
        self.I = sum(b.size for b in self.int_bufs)
        if algorithm == "auto":
            algorithm = "allgather" if R <= 3 else "alltoall"
        self.algorithm = algorithm
        self.meta_words = 3 + self.I
        self.meta_bytes = -(-8 * self.meta_words // 64) * 64
        item = dt.itemsize
        chunks = R if algorithm == "alltoall" else 1
        C = -(-max(self.D, 1) // chunks)
        C = -(-C // (64 // item)) * (64 // item)
        self.C, self.chunks = C, chunks
        self.block = self.meta_bytes + C * item
        if algorithm == "allreduce":
            self.send_data = np.zeros(self.D, dt)
            self.recv_data = np.zeros(self.D, dt)
            self.send_meta = np.zeros(4, np.float64)
            self.recv_meta = np.zeros(4, np.float64)
            self.send_int = np.zeros(max(self.I, 1), np.int64)
            self.recv_int = np.zeros(max(self.I, 1), np.int64)
            self._send_pairs = self._pairs(self.send_data.reshape(1, -1), max(self.D, 1))
            self._recv_pairs = self._pairs(self.recv_data.reshape(1, -1), max(self.D, 1))
            return
        self.send = _aligned(chunks * self.block).reshape(chunks, self.block)
        self.recv = _aligned(R * self.block).reshape(R, self.block)
        self.send_metas = [self.send[k, :self.meta_bytes].view(np.int64) for k in range(chunks)]
        self.recv_metas = self.recv[:, :self.meta_bytes].view(np.int64)
        send_rows = self.send[:, self.meta_bytes:].view(dt)          # (chunks, C)
        self.recv_rows = self.recv[:, self.meta_bytes:].view(dt)     # (R, C)
        self._send_pairs = self._pairs(send_rows, C)
        if algorithm == "alltoall":
            self.acc = np.zeros(C, dt)
            self.gathered = np.zeros(R * C, dt)
            self._recv_pairs = self._pairs(self.gathered.reshape(1, -1), R * C)
        else:
            self.acc = np.zeros(C, dt)
            self._recv_pairs = self._pairs(self.acc.reshape(1, -1), C)

    def _pairs(self, rows, C):
        """(source, destination view) pairs mapping each source array (gradients, float
        buffers) onto the rows of C elements that hold it."""
        pairs, off = [], 0
        for src in self.sources:
            n, done = src.size, 0
            while done < n:
                pos = off + done
                k, i = divmod(pos, C)
                take = min(n - done, C - i)
                pairs.append((src[done:done + take], rows[k, i:i + take]))
                done += take
            off += n
        return pairs

    def reduce(self, loss_value, count, flags, nt):
        """Send this rank's part; returns (metas as rows of int64 words or None, N,
        loss sum, flags OR-ed). The reduced data is written back to the gradients and
        float buffers (divided by N) unless N == 0."""
        m = self.dtype.type(count)
        if self.algorithm == "allreduce":
            return self._allreduce(loss_value, count, flags, m)
        for src, dst in self._send_pairs:
            if count:
                np.multiply(src, m, out=dst)
            else:
                dst.fill(0)
        meta = np.empty(self.meta_words, np.int64)
        meta[0:1].view(np.float64)[0] = loss_value * count if count else 0.0
        meta[1] = count
        meta[2] = flags
        off = 3
        for b in self.int_bufs:
            meta[off:off + b.size] = b.reshape(-1)
            off += b.size
        for sm in self.send_metas:
            sm[:self.meta_words] = meta
        comm = self.comm
        if self.algorithm == "alltoall":
            comm.Alltoall(self.send, self.recv)
        else:
            comm.Allgather(self.send, self.recv)
        metas = self.recv_metas[:, :self.meta_words]
        counts = metas[:, 1]
        N = int(counts.sum())
        loss_sum = 0.0
        for q in range(self.R):                       # rank order
            loss_sum += float(metas[q, 0:1].view(np.float64)[0])
        flag = int(np.bitwise_or.reduce(metas[:, 2]))
        if self.I:
            ints = metas[:, 3:].max(axis=0)
            off = 0
            for b in self.int_bufs:
                b.reshape(-1)[...] = ints[off:off + b.size]
                off += b.size
        if N == 0:
            return N, loss_sum, flag
        rows, acc = self.recv_rows, self.acc
        np.add(rows[0], rows[1], out=acc) if self.R > 1 else np.copyto(acc, rows[0])
        for q in range(2, self.R):
            np.add(acc, rows[q], out=acc)
        if self.algorithm == "alltoall":
            np.divide(acc, self.dtype.type(N), out=acc)
            comm.Allgather(acc, self.gathered)
            for dst, src in self._recv_pairs:
                np.copyto(dst, src)
        else:
            n = self.dtype.type(N)
            for dst, src in self._recv_pairs:
                np.divide(src, n, out=dst)
        return N, loss_sum, flag

    def _allreduce(self, loss_value, count, flags, m):
        MPI = _mpi()
        for src, dst in self._send_pairs:
            if count:
                np.multiply(src, m, out=dst)
            else:
                dst.fill(0)
        self.send_meta[:] = (loss_value * count if count else 0.0, count,
                             1.0 if flags & _LOSS_NONFINITE else 0.0,
                             1.0 if flags & _STOP else 0.0)
        self.comm.Allreduce(self.send_meta, self.recv_meta, op=MPI.SUM)
        if self.I:
            off = 0
            for b in self.int_bufs:
                self.send_int[off:off + b.size] = b.reshape(-1)
                off += b.size
            self.comm.Allreduce(self.send_int, self.recv_int, op=MPI.MAX)
            off = 0
            for b in self.int_bufs:
                b.reshape(-1)[...] = self.recv_int[off:off + b.size]
                off += b.size
        loss_sum, N = float(self.recv_meta[0]), int(self.recv_meta[1])
        flag = (_LOSS_NONFINITE if self.recv_meta[2] else 0) | (_STOP if self.recv_meta[3] else 0)
        if N == 0:
            return N, loss_sum, flag
        self.comm.Allreduce(self.send_data, self.recv_data, op=MPI.SUM)
        n = self.dtype.type(N)
        for dst, src in self._recv_pairs:
            np.divide(src, n, out=dst)
        return N, loss_sum, flag


def tree_blocks(shards, ranks):
    """Whether the ranks' blocks of ``shards // ranks`` consecutive gradient shards are
    nodes of the fixed summation tree over ``shards`` leaves (split at (lo + hi) // 2):
    true for ranks = 1, 2, 4, ... dividing a power-of-two ``shards``."""
    if ranks < 1 or shards % ranks:
        return False
    k = shards // ranks
    blocks = {(r * k, (r + 1) * k) for r in range(ranks)}
    found = set()

    def walk(lo, hi):
        if (lo, hi) in blocks:
            found.add((lo, hi))
            return True
        if hi - lo < 2:
            return False
        mid = (lo + hi) // 2
        return walk(lo, mid) and walk(mid, hi)
    return walk(0, shards) and found == blocks


def _tree_sum(rows, lo, hi, leaf=None):
    """Σ rows[lo:hi] over the fixed tree (split at (lo + hi) // 2), in place: the result
    ends in rows[lo]. ``leaf(lo, hi)`` may name a node whose value is already in
    rows[lo] (a rank's block)."""
    if hi - lo == 1 or (leaf is not None and leaf(lo, hi)):
        return
    mid = (lo + hi) // 2
    _tree_sum(rows, lo, mid, leaf)
    _tree_sum(rows, mid, hi, leaf)
    np.add(rows[lo], rows[mid], out=rows[lo])


class _ShardExchange:
    """Fixed gradient shards: S leaves (m_j times shard j's gradients and float
    buffers), summed over a fixed tree; each rank sums its block of S/R leaves, an
    Allgather brings every block's sum (and every shard's loss sum, count and flags)
    to every rank, and the top of the tree is added in the same order everywhere."""

    def __init__(self, comm, model, shards):
        self.comm, self.S = comm, shards
        self.R, self.rank = comm.Get_size(), comm.Get_rank()
        self.k = shards // self.R
        self.dtype = dt = model.dtype
        grads = model.gradient_buffer
        self.float_bufs = [b for _, b in model.buffers() if b.dtype == dt]
        self.int_bufs = [b for _, b in model.buffers() if b.dtype.kind in "iu"]
        self.sources = ([grads] if grads is not None else []) + \
            [b.reshape(-1) for b in self.float_bufs]
        self.D = sum(a.size for a in self.sources)
        self.I = sum(b.size for b in self.int_bufs)
        item = dt.itemsize
        C = -(-max(self.D, 1) // (64 // item)) * (64 // item)
        self.meta_words = 3 * self.k + self.I
        self.meta_bytes = -(-8 * self.meta_words // 64) * 64
        self.block = self.meta_bytes + C * item
        self.slots = np.zeros((self.k, C), dt)          # this rank's leaves
        self.meta = np.zeros(self.meta_words, np.int64)
        self.send = _aligned(self.block)
        self.recv = _aligned(self.R * self.block).reshape(self.R, self.block)
        self.recv_rows = self.recv[:, self.meta_bytes:].view(dt)
        self.recv_metas = self.recv[:, :self.meta_bytes].view(np.int64)
        self.snapshot = [b.copy() for _, b in model.buffers()]
        self.bufs = [b for _, b in model.buffers()]

    def begin(self):
        for snap, b in zip(self.snapshot, self.bufs):
            np.copyto(snap, b)
        self.meta[:] = 0
        if self.I:
            self.meta[3 * self.k:] = np.iinfo(np.int64).min

    def record(self, j, loss_value, count, flags, last):
        """Leaf j of this rank: m·(gradients, float buffers); then the buffers go back to
        the step's start for the next shard."""
        row = self.slots[j]
        if count:
            off = 0
            m = self.dtype.type(count)
            for src in self.sources:
                np.multiply(src, m, out=row[off:off + src.size])
                off += src.size
        else:
            row.fill(0)
        self.meta[3 * j:3 * j + 1].view(np.float64)[0] = loss_value * count if count else 0.0
        self.meta[3 * j + 1] = count
        self.meta[3 * j + 2] = flags
        if self.I and count:
            off = 3 * self.k
            for b in self.int_bufs:
                np.maximum(self.meta[off:off + b.size], b.reshape(-1), out=self.meta[off:off + b.size])
                off += b.size
        if not last:
            for snap, b in zip(self.snapshot, self.bufs):
                np.copyto(b, snap)

    def reduce(self, stop):
        _tree_sum(self.slots, 0, self.k)
        send = self.send
        send[:self.meta_bytes].view(np.int64)[:self.meta_words] = self.meta
        send[self.meta_bytes:].view(self.dtype)[:] = self.slots[0]
        if stop:  # rides on the first shard's flags
            send[:self.meta_bytes].view(np.int64)[2] |= _STOP
        if self.R > 1:
            self.comm.Allgather(send, self.recv)
        else:
            self.recv[0] = send
        metas = self.recv_metas[:, :self.meta_words]
        per = metas[:, :3 * self.k].reshape(self.S, 3)  # shard order
        N = int(per[:, 1].sum())
        loss_sum = 0.0
        for j in range(self.S):
            loss_sum += float(per[j, 0:1].view(np.float64)[0])
        flag = int(np.bitwise_or.reduce(per[:, 2]))
        if self.I:
            ints = metas[:, 3 * self.k:].max(axis=0)
            if ints.min() == np.iinfo(np.int64).min:        # no shard had samples
                ints = None
            off = 0
            for b in self.int_bufs if ints is not None else ():
                b.reshape(-1)[...] = ints[off:off + b.size]
                off += b.size
        if N == 0:
            return N, loss_sum, flag
        k = self.k
        rows = self.recv_rows
        blocks = {(r * k, (r + 1) * k): r for r in range(self.R)}
        # the top of the tree: its leaves are the ranks' block sums (rows[r])

        def top(lo, hi):
            if (lo, hi) in blocks:
                return blocks[(lo, hi)]
            mid = (lo + hi) // 2
            a, b = top(lo, mid), top(mid, hi)
            np.add(rows[a], rows[b], out=rows[a])
            return a
        res = rows[top(0, self.S)]
        n = self.dtype.type(N)
        off = 0
        for dst in self.sources:
            np.divide(res[off:off + dst.size], n, out=dst)
            off += dst.size
        return N, loss_sum, flag


# -- the optimizer ----------------------------------------------------------------------
class DistributedOptimizer:
    """``DistributedOptimizer(optimizer, comm=None, algorithm="auto", threads="auto")``:
    wraps a cdl optimizer for data-parallel training; ``comm`` defaults to COMM_WORLD.

    Use it wherever the optimizer goes: ``model.train_step(x_shard, y_shard, loss,
    dopt)``, ``model.fit(x, y, loss, dopt, ...)``, schedules and checkpoints (the
    learning rate, ``steps``, ``state_dict()`` are the wrapped optimizer's; a saved
    file holds the wrapped optimizer's state and loads without MPI).

    Each step (:meth:`gradient_hook`): every rank contributes m_r·g_r (its mean
    gradient times its sample count m_r) and m_r times its float buffers; the sum in
    rank order divided by N = Σ m_r replaces the gradients and buffers on every
    rank. For losses that average over the batch (the default) this is the gradient
    of the global batch, L2 included; the loss returned is Σ m_r·L_r / N. Integer
    buffers (BatchNorm's ``num_batches_tracked``) take the maximum. ``algorithm``:
    ``allgather`` (everyone adds every message; the default up to 3 ranks),
    ``alltoall`` (each rank adds one chunk, then an Allgather; 2x the data of a
    ring allreduce whatever the ranks; the default from 4 ranks) — both give the
    same bits — or ``allreduce`` (MPI's Allreduce: not reproducible from run to run
    on 3 or more ranks; a second small message carries the loss and flags).

    ``threads="auto"`` sets cdl's threads to :func:`threads_per_rank` unless they
    were chosen (``cdl.set_num_threads`` or OMP_NUM_THREADS); an int sets them.
    Construction is collective (every rank of ``comm`` makes its optimizer).

    ``shards=S`` (fixed gradient shards): each global batch is cut into S shards
    (``batch_piece(start, stop, j, S)``); rank r trains on shards r·S/R … (r+1)·S/R − 1
    (:meth:`piece`), back-propagating each one separately (``train_step`` runs them one
    by one through :meth:`micro_batches` and the hook), with BatchNorm statistics
    restarted from the step's start for each shard. The S contributions are summed
    over a fixed binary tree, each rank summing its own subtree, so training is
    bit-identical on 1, 2, 4, … S ranks (R must cut the tree into whole subtrees:
    :func:`tree_blocks`), one process included. It costs the efficiency of S smaller
    batches (bench/results/distributed.md measures it); Dropout is refused.
    """

    def __init__(self, optimizer, comm=None, algorithm="auto", threads="auto", shards=None):
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("DistributedOptimizer: the optimizer is already distributed")
        if not callable(getattr(optimizer, "step", None)) or \
                getattr(optimizer, "model", None) is None:
            raise TypeError(f"DistributedOptimizer: optimizer must be a cdl optimizer (e.g. "
                            f"cdl.SGD(model, lr=0.01)), got {type(optimizer).__name__}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"DistributedOptimizer: algorithm must be one of {ALGORITHMS}, "
                             f"got {algorithm!r}")
        dt = optimizer.model.dtype
        for name, b in optimizer.model.buffers():
            # the exchange averages buffers of the model's dtype and agrees on integers;
            # one of another float dtype (a user layer's float64 statistics in a float32
            # model) would drift apart on the ranks
            if b.dtype != dt and b.dtype.kind not in "iu":
                raise ValueError(f"DistributedOptimizer: buffer {name} is {b.dtype}, neither "
                                 f"the model's {dt} nor an integer, so the ranks could not "
                                 f"keep it identical; hold it in {dt}")
        self.__dict__["optimizer"] = optimizer
        self.comm = _comm(comm, "DistributedOptimizer")
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        if threads == "auto":
            # collective on every rank, whether or not this rank's threads were chosen
            # (a rank skipping it would leave the others waiting)
            per_rank = threads_per_rank(self.comm)
            if not _config.threads_chosen():
                _config.set_num_threads(per_rank)
                _config._state["explicit"] = False
        elif threads is not None:
            _config.set_num_threads(threads)
        self.algorithm = algorithm
        for _, layer in optimizer.model.chain.walk():
            layer.set_replica(self.rank)        # each rank draws its own dropout masks
        self.shards = None
        if shards is not None:
            if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
                raise ValueError(f"DistributedOptimizer: shards must be an int >= 1, got "
                                 f"{shards!r}")
            if not tree_blocks(shards, self.size):
                raise ValueError(f"DistributedOptimizer: shards={shards} on {self.size} ranks: "
                                 f"the ranks must divide the shards into blocks of the fixed "
                                 f"summation tree (e.g. shards a power of two and 1, 2, 4, ... "
                                 f"ranks up to shards)")
            for path, layer in optimizer.model.chain.walk():
                if layer.extra_state():
                    raise ValueError(f"DistributedOptimizer: shards= needs a model without "
                                     f"per-pass random state ({type(layer).__name__} at "
                                     f"{path.rstrip('.')}): its masks would depend on the "
                                     f"number of ranks")
            self.shards = shards
            self._pieces = 0
            self._done = 0
        self._exchange = None
        self._reduced = False
        self._stop = False
        self.stop_requested = False
        self.last_count = 0
        self.last_skip = None

    # the wrapped optimizer's settings and state
    model = property(lambda self: self.optimizer.model)
    pack = property(lambda self: self.optimizer.pack)
    buffers = property(lambda self: self.optimizer.buffers)

    # train_step's step (_step_if_finite): the hook (_decide) has checked the averaged
    # gradients, except on one process without shards, where it passes the loss through
    # and the wrapped optimizer checks as it would alone (unless a subclass's step must
    # run: then the model checks, and calls it).
    @property
    def fuses_finite_check(self):
        return not self._passes_through or (
            type(self).step is DistributedOptimizer.step and _fuses_finite_check(self.optimizer))

    @property
    def _passes_through(self):
        return self.shards is None and self.size == 1

    def _step_if_finite(self, nt):
        if self._passes_through:
            self._reduced = False
            return self.optimizer._step_if_finite(nt)
        self.step(nt)
        return True

    def __getattr__(self, name):
        if name.startswith("__") or name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __setattr__(self, name, value):
        # the wrapped optimizer's settings (momentum, weight_decay, ...) are set there: kept
        # here they would read back as set and train as before
        opt = self.__dict__.get("optimizer")
        if name in ("lr", "base_lr", "steps", "clip_grad_norm") or (
                opt is not None and name in opt.get_config()):
            setattr(opt, name, value)
        else:
            object.__setattr__(self, name, value)

    def state_dict(self):
        """The wrapped optimizer's ``state_dict()`` (the same on every rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state, where=None):
        return self.optimizer.load_state_dict(state, where)

    def get_config(self):
        return self.optimizer.get_config()

    def __repr__(self):
        return (f"DistributedOptimizer({self.optimizer!r}, ranks={self.size}, "
                f"algorithm={self.algorithm!r})")

    def check_loss(self, loss, where="DistributedOptimizer"):
        """Raise ValueError unless ``loss`` averages over the batch: the exchange weights
        each rank's mean gradient by its sample count (a summed loss, and the L2 term
        each rank adds, would be counted once per rank). ``train_step`` and ``fit``
        call it."""
        reduction = getattr(loss, "reduction", "mean")
        if reduction != "mean":
            raise ValueError(f"{where}: distributed training needs a loss that averages over "
                             f"the batch (reduction='mean'), got reduction={reduction!r}")

    # -- the step ----------------------------------------------------------------------
    def request_stop(self):
        """Ask every rank to stop: ``stop_requested`` becomes True on every rank after the
        next step (the request rides on that step's message; fit uses it for Ctrl-C)."""
        self._stop = True

    def piece(self, start, stop):
        """The part [lo, hi) of the global batch [start, stop) that this rank trains on:
        ``batch_piece(start, stop, rank, ranks)``, or with ``shards=S`` the union of this
        rank's S/ranks consecutive shards (``batch_piece(start, stop, j, S)``)."""
        if self.shards is None:
            return batch_piece(start, stop, self.rank, self.size)
        k = self.shards // self.size
        lo = batch_piece(start, stop, self.rank * k, self.shards)[0]
        hi = batch_piece(start, stop, (self.rank + 1) * k - 1, self.shards)[1]
        return lo, hi

    def micro_batches(self, n):
        """With ``shards=S``: the (lo, hi) of this rank's S/ranks shards within its local
        batch of n samples (``train_step`` then runs the forward and backward passes
        shard by shard and calls the hook after each); None otherwise."""
        if self.shards is None:
            return None
        k = self.shards // self.size
        if self._exchange is None:
            self._exchange = _ShardExchange(self.comm, self.model, self.shards)
        self._exchange.begin()
        self._pieces, self._done = k, 0
        return [batch_piece(0, n, i, k) for i in range(k)]

    def gradient_hook(self, loss_value, batch_size, threads=None):
        """Average the gradients of all ranks; returns the global loss, or NaN on every
        rank when any rank's loss or the averaged gradient is not finite (the step is
        then skipped everywhere; ``last_skip`` says why). ``batch_size`` 0: this rank
        joins the step with no samples. Collective: every rank calls it once per step
        (``train_step`` and ``fit`` do)."""
        value = self._hook(loss_value, batch_size, threads or _config.get_num_threads())
        self._reduced = math.isfinite(value)
        return value

    def _hook(self, loss_value, batch_size, nt):
        self.last_skip = None
        if self.shards is not None:
            return self._shard_hook(loss_value, batch_size, nt)
        if self.size == 1:
            self.last_count = batch_size
            self.stop_requested, self._stop = self._stop, False
            return loss_value
        if self._exchange is None:
            self._exchange = _Exchange(self.comm, self.model, self.algorithm)
        finite = math.isfinite(loss_value)
        flags = (0 if finite or not batch_size else _LOSS_NONFINITE) | (_STOP if self._stop else 0)
        N, loss_sum, flag = self._exchange.reduce(loss_value if finite else math.nan,
                                                  int(batch_size), flags, nt)
        return self._decide(N, loss_sum, flag, nt)

    def _decide(self, N, loss_sum, flag, nt):
        self._stop = False
        self.stop_requested = bool(flag & _STOP)
        self.last_count = N
        if flag & _LOSS_NONFINITE:
            self.last_skip = "the loss was not finite on at least one rank"
            return math.nan
        if N == 0:
            self.last_skip = "no rank had samples"
            return math.nan
        if not self.model._gradients_finite(nt):
            self.last_skip = (f"the averaged gradient was not finite (the global loss was "
                              f"{loss_sum / N:.6g})")
            return math.nan
        value = loss_sum / N
        if not math.isfinite(value):
            self.last_skip = "the global loss was not finite"
        return value

    def _shard_hook(self, loss_value, batch_size, nt):
        if self._pieces == 0:
            if batch_size:
                raise RuntimeError("DistributedOptimizer(shards=...): the gradients must "
                                   "come from train_step or fit (they run the shards one by "
                                   "one), not from compute_gradients")
            # a rank with no samples in this step: all its shards are empty (the exchange
            # may be made here, on a rank whose first step is empty)
            self.micro_batches(0)
            ex = self._exchange
            for j in range(self._pieces):
                ex.record(j, 0.0, 0, 0, True)
            self._done = self._pieces
        else:
            ex = self._exchange
            finite = math.isfinite(loss_value)
            flags = 0 if finite or not batch_size else _LOSS_NONFINITE
            self._done += 1
            ex.record(self._done - 1, loss_value if finite else math.nan, int(batch_size),
                      flags, self._done == self._pieces)
            if self._done < self._pieces:
                return 0.0
        self._pieces = 0
        N, loss_sum, flag = ex.reduce(self._stop)
        return self._decide(N, loss_sum, flag, nt)

    def step(self, threads=None):
        """Update every replica. After :meth:`gradient_hook` (as in ``train_step`` and
        ``fit``) this is the wrapped optimizer's step; called alone (after
        ``model.compute_gradients``) it first averages the gradients with equal weights
        per rank, skipping the update everywhere if the result is not finite."""
        nt = threads or _config.get_num_threads()
        if not self._reduced and not math.isfinite(self.gradient_hook(0.0, 1, nt)):
            return
        self._reduced = False
        self.optimizer.step(nt)
