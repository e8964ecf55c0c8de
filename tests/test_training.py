"""fit: accuracy on real digits, validation, shuffling, callbacks, NaN stop, Ctrl-C."""
import io
import os
import re
import signal

import numpy as np
import pytest

import cdl


def digits_cnn(seed=0):
    return cdl.Sequential([cdl.Conv2d(1, 16, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Conv2d(16, 32, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Flatten(), cdl.Linear(128, 10)], (1, 8, 8), seed=seed)


def tiny(seed=0, **kw):
    return cdl.Sequential([cdl.Linear(4, 8), cdl.ReLU(), cdl.Linear(8, 3)], (4,), seed=seed, **kw)


def blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 4)).astype(np.float32) * 0.3
    x[np.arange(n), y] += 2.0
    return x, y


def test_digits_cnn_reaches_97_percent():
    pytest.importorskip("sklearn")
    x, y = cdl.datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:360], order[360:]
    m = digits_cnn(seed=0)
    loss = cdl.SoftmaxCrossEntropy()
    opt = cdl.SGD(m, lr=0.05, momentum=0.9)
    h = m.fit(x[train], y[train], loss, opt, epochs=12, batch_size=32,
              validation_data=(x[test], y[test]), callbacks=[cdl.CosineLR(12)], verbose=0)
    _, acc = m.evaluate(x[test], y[test], loss)
    assert acc >= 0.97, h.history
    assert len(h["loss"]) == 12 and h["loss"][-1] < h["loss"][0]
    assert h["val_accuracy"][-1] == acc
    assert h["lr"][0] == 0.05 and h["lr"][-1] < 0.01  # the cosine schedule was applied


def test_fit_history_validation_split_and_verbose(capsys):
    x, y = blobs(50)
    m = tiny()
    h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=3, batch_size=8,
              validation_split=0.2, verbose=2)
    assert set(h.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr"}
    assert all(len(v) == 3 for v in h.history.values())
    err = capsys.readouterr().err
    assert err.count("Epoch ") == 3 and "samples/s" in err and "val_accuracy" in err
    assert "\r" not in err  # plain lines when stderr is not a terminal
    # the rate is samples over the epoch's own time, not over the instant the line is printed
    rates = [float(r.replace(",", "")) for r in re.findall(r"([\d,]+) samples/s", err)]
    for rate, seconds in zip(rates, h["seconds"]):
        assert rate <= 1.5 * 40 / seconds
    v_loss, v_acc = m.evaluate(x[40:], y[40:], cdl.SoftmaxCrossEntropy())
    assert h["val_loss"][-1] == pytest.approx(v_loss) and h["val_accuracy"][-1] == v_acc


def test_progress_line_shows_a_nan_loss_but_not_an_undefined_accuracy():
    bar = cdl.progress.ProgressBar(10, 1, 1, file=io.StringIO())
    line = bar._line(10, {"loss": 0.5, "accuracy": float("nan"), "val_loss": float("nan")})
    assert "loss 0.5000" in line and "val_loss nan" in line and "accuracy" not in line
    line = bar._line(5, {"loss": float("nan"), "acc": float("nan")})   # fit's per-step keys
    assert "loss nan" in line and "acc" not in line


def test_fit_shuffles_without_replacement_and_keeps_partial_batch(monkeypatch):
    m = cdl.Sequential([cdl.Linear(1, 2)], (1,), seed=0)
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.zeros(10, np.int64)
    seen = []
    real = m._train_step

    def spy(xb, yb, loss, opt, nt):
        seen.append(xb[:, 0].astype(int).tolist())
        return real(xb, yb, loss, opt, nt)
    monkeypatch.setattr(m, "_train_step", spy)
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.01), epochs=2, batch_size=4, verbose=0)
    assert [len(b) for b in seen] == [4, 4, 2, 4, 4, 2]
    e1, e2 = sum(seen[:3], []), sum(seen[3:], [])
    assert sorted(e1) == list(range(10)) and sorted(e2) == list(range(10))
    assert e1 != e2 and e1 != list(range(10))


def test_fit_is_reproducible_with_seed():
    x, y = blobs()
    ws = []
    for _ in range(2):
        m = tiny(seed=5)
        m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1, momentum=0.9), epochs=2,
              batch_size=7, verbose=0)
        ws.append(m.get_weights())
    for k in ws[0]:
        assert ws[0][k].tobytes() == ws[1][k].tobytes()


def test_nan_loss_stops_with_epoch_and_step():
    x, y = blobs()
    x[:] *= 1e3
    m = tiny()
    with pytest.warns(RuntimeWarning, match=r"loss became (nan|inf) at epoch \d+, step \d+ of 8"):
        h = m.fit(x, y, cdl.MSE(), cdl.SGD(m, lr=1e3), epochs=5, batch_size=8, verbose=0)
    assert "epoch" in h.stop_reason
    for _, p, _ in m.parameters():
        assert np.isfinite(p).all()  # the non-finite step's update was skipped
    assert len(h.epochs) < 5


def test_nan_input_reported_with_epoch_and_step():
    x, y = blobs(16)
    x[5, 2] = np.nan
    m = tiny()
    before = m.get_weights()
    with pytest.warns(RuntimeWarning, match=r"at epoch 1, step 1 of 2.*NaN or Inf inputs"):
        h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=2,
                  batch_size=8, shuffle=False, verbose=0)
    assert h.epochs == []
    for k, w in m.get_weights().items():  # the poisoned update was skipped
        np.testing.assert_array_equal(w, before[k])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_history_loss_is_on_evaluates_scale_for_any_batch_size(reduction):
    # frozen weights (a tiny lr): the epoch's loss is evaluate's, L2 counted once
    x, y = blobs(61)
    loss = cdl.SoftmaxCrossEntropy(reduction=reduction)
    for bs in (61, 16, 4):
        m = tiny(l2=1e-2)
        h = m.fit(x, y, loss, cdl.SGD(m, lr=1e-12), batch_size=bs, shuffle=False, verbose=0,
                  validation_data=(x, y))
        want, _ = m.evaluate(x, y, loss)
        assert h["loss"][0] == pytest.approx(want, rel=1e-6), bs
        assert h["val_loss"][0] == pytest.approx(want, rel=1e-12)


def _step_state(m, opt):
    return [a.copy() for a in (m.parameter_buffer, *opt.buffers.values())]


@pytest.mark.parametrize("use_plan", [True, False])
def test_nonfinite_gradient_with_a_finite_loss_skips_the_update(use_plan):
    # float32 gradients overflow where the loss, summed in float64, is finite
    m = cdl.Sequential([cdl.Linear(2, 1)], (2,), seed=0)
    m._use_plans = use_plan
    opt = cdl.SGD(m, lr=0.1, momentum=0.9)
    x = np.array([[1e20, -1e20], [2e20, 1e20]], np.float32)
    y = np.array([[0.0], [1.0]], np.float32)
    assert np.isfinite(cdl.MSE().forward(m.predict(x), y))
    before = _step_state(m, opt)
    assert np.isnan(m.train_step(x, y, cdl.MSE(), opt))
    for a, b in zip(before, _step_state(m, opt)):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("make", [
    lambda m: cdl.SGD(m, lr=0.1, momentum=0.9), lambda m: cdl.Adam(m),
    lambda m: cdl.AdamW(m, clip_grad_norm=0.5), lambda m: cdl.SGD(m, lr=0.1, clip_grad_norm=0.5)])
@pytest.mark.parametrize("value", [np.nan, -np.inf])
def test_a_nonfinite_gradient_in_any_part_skips_the_whole_update(make, value):
    # The update kernels check the gradients themselves: each thread its own parts
    # (a big Linear's are row chunks owned by different threads), all before anyone
    # updates. A poisoned gradient anywhere leaves every parameter, optimizer buffer,
    # gradient and the step count as they were; the next clean step runs.
    m = cdl.Sequential([cdl.Linear(64, 512), cdl.ReLU(), cdl.Linear(512, 512), cdl.ReLU(),
                        cdl.Linear(512, 10)], (64,), seed=0)
    opt = make(m)
    x, y = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32), np.arange(8)
    loss = cdl.SoftmaxCrossEntropy()
    grads = m.parameter_pack.grads
    poison, seen = [], []

    def hook(v, n, nt=None):
        grads[poison] = value
        seen[:] = [grads.copy()]
        return v
    opt.gradient_hook = hook
    assert opt.fuses_finite_check
    with cdl.threads(2):
        m.train_step(x, y, loss, opt)
        parts = m.parameter_pack.parts
        assert parts[:, 2].max() >= 1
        for k in (0, grads.size // 2, parts[-1, 1] - 1):
            poison[:] = [k]
            before = _step_state(m, opt)
            steps = opt.steps
            assert np.isnan(m.train_step(x, y, loss, opt))
            assert m._skip_reason.startswith("a gradient was not finite"), k
            assert opt.steps == steps, k
            for a, b in zip(before, _step_state(m, opt)):
                assert a.tobytes() == b.tobytes(), k
            assert grads.tobytes() == seen[0].tobytes(), k      # not clipped either
        poison[:] = []
        before = m.parameter_buffer.copy()
        assert np.isfinite(m.train_step(x, y, loss, opt))
        assert opt.steps == steps + 1 and (m.parameter_buffer != before).any()


def test_subclasses_overriding_step_clip_or_update_keep_their_methods():
    # SGD/Adam's fused check bypasses step and clip_gradients: a subclass that overrides
    # one of them (or _update with the documented _update(nt)) is stepped through its
    # own methods, with the model checking the gradients first.
    calls = []

    class LogStep(cdl.SGD):
        def step(self, threads=None):
            calls.append("step")
            super().step(threads)

    class LogClip(cdl.Adam):
        def clip_gradients(self, max_norm, nt=None):
            calls.append("clip")
            return super().clip_gradients(max_norm, nt)

    class OldUpdate(cdl.SGD):
        def _update(self, nt):
            calls.append("update")
            super()._update(nt)

    class Declared(OldUpdate):
        fuses_finite_check = False

    class StepMixin:            # not an Optimizer: its override comes through the MRO
        def step(self, threads=None):
            calls.append("step")
            super().step(threads)

    class Mixed(StepMixin, cdl.SGD):
        pass

    class Patched(cdl.SGD):     # its instance's step is replaced below
        pass

    x, y = np.ones((2, 4), np.float32), np.array([0, 1])
    for cls, kw, want in ((LogStep, {}, "step"), (LogClip, {"clip_grad_norm": 0.1}, "clip"),
                          (OldUpdate, {}, "update"), (Declared, {}, "update"),
                          (Mixed, {}, "step"), (Patched, {}, "step")):
        m = cdl.Sequential([cdl.Linear(4, 3)], (4,), seed=0)
        opt = cls(m, lr=0.1, **kw) if cls is not LogClip else cls(m, **kw)
        if cls is Patched:
            assert Patched.fuses_finite_check
            plain_step = opt.step
            opt.step = lambda threads=None: (calls.append("step"), plain_step(threads))[1]
        else:
            assert not opt.fuses_finite_check
        calls.clear()
        assert np.isfinite(m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt))
        assert calls == [want] and opt.steps == 1, cls
        before = _step_state(m, opt)
        opt.gradient_hook = lambda v, n, nt=None: (m.parameter_pack.grads.__setitem__(0, np.nan),
                                                   v)[1]
        calls.clear()
        assert np.isnan(m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt))
        assert calls == [] and opt.steps == 1, cls
        for a, b in zip(before, _step_state(m, opt)):
            assert a.tobytes() == b.tobytes()
    assert cdl.SGD.fuses_finite_check and cdl.AdamW.fuses_finite_check


def test_clipping_still_steps_when_finite_float64_gradients_overflow_the_norm():
    # ‖g‖² overflows float64 while every gradient is finite: the step runs, clipped
    # (as max_norm / inf = 0 scales it), as it did before the check moved into the update.
    m = cdl.Sequential([cdl.Linear(2, 1, bias=False)], (2,), dtype=np.float64, seed=0)
    opt = cdl.SGD(m, lr=0.1, clip_grad_norm=1.0)
    opt.gradient_hook = lambda v, n, nt=None: (m.parameter_pack.grads.fill(1e200), v)[1]
    w = m.parameter_buffer.copy()
    x, y = np.ones((1, 2)), np.zeros((1, 1))
    assert np.isfinite(m.train_step(x, y, cdl.MSE(), opt))
    assert opt.steps == 1 and m._skip_reason is None
    assert (m.parameter_buffer == w).all()      # clipped to zero, not skipped


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fit_stops_on_a_nonfinite_gradient_naming_it_and_the_inputs(dtype):
    # an Inf input saturates the sigmoid: the loss is finite, 0 · Inf makes the
    # first weight's gradient NaN
    m = cdl.Sequential([cdl.Linear(1, 2), cdl.Sigmoid(), cdl.Linear(2, 2)], (1,), dtype=dtype,
                       seed=0)
    x = np.array([[np.inf], [0.5], [0.1], [0.2]], dtype)
    y = np.array([0, 1, 0, 1])
    opt = cdl.Adam(m)
    before = _step_state(m, opt)
    with pytest.warns(RuntimeWarning, match=r"a gradient was not finite \(the loss was [0-9.]+\) "
                                            r"at epoch 1, step 1 of 2.*NaN or Inf inputs"):
        h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=2, batch_size=2,
                  shuffle=False, verbose=0)
    assert h.epochs == [] and "gradient was not finite" in h.stop_reason
    for a, b in zip(before, _step_state(m, opt)):
        assert a.tobytes() == b.tobytes()


def test_early_stopping_restores_best_weights():
    # BatchNorm's running statistics are part of what the best epoch evaluated with
    m = cdl.Sequential([cdl.Linear(2, 4), cdl.BatchNorm1d(4), cdl.ReLU(), cdl.Linear(4, 3)],
                       (2,), seed=0)
    es = cdl.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    es.set_context(m, None)
    es.on_train_begin()
    snapshots = []
    for epoch, v in enumerate([1.0, 0.5, 0.6, 0.7, 0.1]):
        for _, p, _ in m.parameters():
            p += 1.0
        for _, b in m.buffers():
            b += 1
        snapshots.append(m.state_dict())
        es.on_epoch_end(epoch, {"val_loss": v})
        if m.stop_training:
            break
    es.on_train_end()
    assert epoch == 2 and es.best_epoch == 1 and es.stopped_epoch == 2   # patience 1: Keras
    state = m.state_dict()
    assert "1.running_mean" in state and "1.num_batches_tracked" in state
    for k, w in state.items():
        np.testing.assert_array_equal(w, snapshots[1][k], err_msg=k)


def test_callback_arguments_are_checked():
    for kw, exc, match in ((dict(patience="3"), TypeError, r"patience must be an int"),
                           (dict(patience=float("nan")), TypeError, r"patience must be an int"),
                           (dict(patience=-1), ValueError, r"patience must be >= 0"),
                           (dict(monitor=None), TypeError, r"monitor must be a log key"),
                           (dict(min_delta="x"), TypeError, r"min_delta must be a number"),
                           (dict(mode="up"), ValueError, r"mode must be 'auto', 'min' or 'max'")):
        with pytest.raises(exc, match=rf"EarlyStopping: {match}"):
            cdl.EarlyStopping(**kw)
    with pytest.raises(TypeError, match=r"ModelCheckpoint: path must be a str or path, got "
                                        r"NoneType"):
        cdl.ModelCheckpoint(None)
    with pytest.raises(TypeError, match=r"ModelCheckpoint: monitor must be a log key"):
        cdl.ModelCheckpoint("m.npz", monitor=3)


def test_early_stopping_counts_a_nan_epoch_as_no_improvement():
    # as Keras does: a NaN val_loss every epoch stops training after `patience` epochs
    m = tiny()
    es = cdl.EarlyStopping(monitor="val_loss", patience=1)
    es.set_context(m, None)
    es.on_train_begin()
    for epoch in range(5):
        es.on_epoch_end(epoch, {"val_loss": float("nan")})
        if m.stop_training:
            break
    assert es.stopped_epoch == 1 and es.best_epoch is None


@pytest.mark.parametrize("patience,stops_at", [(0, 2), (1, 2), (2, 3), (3, 4)])
def test_early_stopping_patience_counts_as_keras(patience, stops_at):
    # the patience-th epoch in a row without improvement is the last (0 stops as 1)
    m = tiny()
    es = cdl.EarlyStopping(monitor="loss", patience=patience)
    es.set_context(m, None)
    es.on_train_begin()
    for epoch, v in enumerate([3.0, 2.0, 2.5, 2.5, 2.5, 2.5, 2.5]):
        es.on_epoch_end(epoch, {"loss": v})
        if m.stop_training:
            break
    assert es.stopped_epoch == stops_at


@pytest.mark.parametrize("monitor,val", [("acc", False), ("val_acc", True),
                                         ("validation_loss", True)])
def test_a_monitor_fit_does_not_log_is_warned_at_the_start(monitor, val):
    x, y = blobs()
    m = tiny()
    es = cdl.EarlyStopping(monitor=monitor, patience=0)
    ck = cdl.ModelCheckpoint("unused.npz", monitor=monitor, save_best_only=True)
    kw = dict(validation_data=(x[:10], y[:10])) if val else {}
    with pytest.warns(RuntimeWarning) as record:
        m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=2, verbose=0,
              callbacks=[es, ck], **kw)
    said = [str(w.message) for w in record]
    for name in ("EarlyStopping", "ModelCheckpoint"):
        hits = [w for w in said if w.startswith(f"{name}: monitor {monitor!r} is not among "
                                                 f"fit's logs")]
        assert len(hits) == 1 and "accuracy" in hits[0], said
    assert not any("no validation data" in w for w in said)
    assert ck.saved == []


def test_a_val_monitor_without_validation_data_falls_back_with_one_warning():
    x, y = blobs()
    m = tiny()
    es = cdl.EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9)
    with pytest.warns(RuntimeWarning, match="no val_loss \\(no validation data\\); monitoring "
                                            "loss instead") as record:
        h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=5, verbose=0,
                  callbacks=[es])
    assert len(record) == 1 and es.stopped_epoch == 1 and len(h.epochs) == 2


def test_early_stopping_in_fit():
    x, y = blobs()
    m = tiny()
    es = cdl.EarlyStopping(monitor="loss", patience=0, min_delta=1e9)
    h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=10, verbose=0,
              callbacks=[es])
    assert len(h.epochs) == 2 and es.stopped_epoch == 1


def test_model_checkpoint_writes_loadable_files_atomically(tmp_path):
    x, y = blobs()
    m = tiny()
    ck = cdl.ModelCheckpoint(str(tmp_path / "ck-{epoch:02d}.npz"), monitor="loss")
    best = cdl.ModelCheckpoint(tmp_path / "best.npz", monitor="val_loss", save_best_only=True)
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=3, verbose=0,
          validation_split=0.25, callbacks=[ck, best])
    names = sorted(os.listdir(tmp_path))
    assert names == ["best.npz", "ck-01.npz", "ck-02.npz", "ck-03.npz"]  # no temp files left
    np.testing.assert_array_equal(cdl.load(tmp_path / "ck-03.npz").predict(x), m.predict(x))


def test_model_checkpoint_path_is_checked_before_the_first_epoch(tmp_path):
    x, y = blobs()
    m = tiny()
    before = m.state_dict()
    handler = signal.getsignal(signal.SIGINT)
    for path, match in (("ck-{val_loss:.3f}.npz", r"KeyError: 'val_loss'"),  # no validation
                        ("{0}.npz", r"ValueError: Format string contains positional fields"),
                        ("{loss:d}.npz", r"ValueError: Unknown format code 'd'")):
        ck = cdl.ModelCheckpoint(str(tmp_path / path), monitor="loss")
        with pytest.raises(ValueError, match=r"ModelCheckpoint: path .* cannot be filled from "
                                             r"epoch and the logs \(loss, accuracy, lr, "
                                             r"seconds\): " + match):
            m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), verbose=0,
                  callbacks=[ck])
    for k, v in m.state_dict().items():       # refused before any step
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert signal.getsignal(signal.SIGINT) is handler
    # with validation data val_loss fills the path; missing folders are made
    ck = cdl.ModelCheckpoint(str(tmp_path / "runs" / "a" / "ck-{val_loss:.3f}.npz"))
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), verbose=0,
          validation_split=0.25, callbacks=[ck])
    assert len(ck.saved) == 1 and os.path.isfile(ck.saved[0])

    # a key another callback adds to the logs is taken on trust; one nobody adds fails
    # at the epoch's end, naming the keys there are
    class F1(cdl.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["f1"] = 0.25
    ck = cdl.ModelCheckpoint(str(tmp_path / "f1-{f1:.2f}.npz"))
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), verbose=0, callbacks=[F1(), ck])
    assert ck.saved == [str(tmp_path / "f1-0.25.npz")]
    with pytest.raises(ValueError, match=r"this epoch's logs \(loss, accuracy, lr, seconds\): "
                                         r"KeyError: 'acc'"):
        m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), verbose=0,
              callbacks=[cdl.ModelCheckpoint(str(tmp_path / "{acc}.npz"))])


@pytest.fixture
def sigint_handled():
    """Python's SIGINT handler for a test that sends itself one: a background job (some
    CI runners) starts with SIGINT ignored, which fit leaves as it is."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_an_ignored_sigint_stays_ignored():
    # a process told to ignore SIGINT (`cmd &` from a script, nohup) kept training through
    # Ctrl-C until fit started, then stopped on it
    x, y = blobs(64)
    m = tiny()

    class Interrupt(cdl.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=3,
                  batch_size=8, callbacks=[Interrupt()], verbose=0)
        assert h.stop_reason is None and len(h.epochs) == 3
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_stops_between_steps_and_model_stays_usable(sigint_handled):
    x, y = blobs(64)
    m = tiny()
    before = signal.getsignal(signal.SIGINT)

    class Interrupt(cdl.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)
    h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=5, batch_size=8,
              callbacks=[Interrupt()], verbose=0)
    assert "interrupted" in h.stop_reason and "epoch 2, step 1" in h.stop_reason
    assert len(h.epochs) == 1
    assert signal.getsignal(signal.SIGINT) is before  # fit put the previous handler back
    assert np.isfinite(m.predict(x)).all()
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1), epochs=1, verbose=0)


@pytest.mark.parametrize("at_epoch", [1, 2])
def test_ctrl_c_at_the_end_of_an_epoch_stops_before_the_next_and_is_reported(at_epoch,
                                                                             sigint_handled):
    # during the epoch's callbacks (a checkpoint being written, say), the last epoch's too
    x, y = blobs(64)
    m = tiny()
    begun, steps = [], []

    class Interrupt(cdl.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            begun.append(epoch)

        def on_epoch_end(self, epoch, logs=None):
            steps.append(opt.steps)
            if epoch == at_epoch:
                os.kill(os.getpid(), signal.SIGINT)
    opt = cdl.SGD(m, lr=0.1)
    h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=3, batch_size=8,
              callbacks=[Interrupt()], verbose=0)
    assert h.stop_reason and f"interrupted (Ctrl-C) at the end of epoch {at_epoch + 1}" \
        in h.stop_reason
    assert h.epochs == list(range(at_epoch + 1)) and begun == h.epochs
    assert opt.steps == steps[-1] == 8 * (at_epoch + 1)


def test_schedules_start_from_an_lr_set_by_hand(tmp_path):
    # as a PyTorch scheduler made after the change: StepLR(2, 0.5) from 0.001
    x, y = blobs(16)
    m = tiny()
    opt = cdl.SGD(m, lr=0.1)
    opt.lr = 0.001
    seen = []

    class Record(cdl.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(opt.lr)
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=4, verbose=0,
          callbacks=[cdl.StepLR(2, 0.5), Record()])
    assert seen == [0.001, 0.001, 0.0005, 0.0005] and opt.base_lr == 0.001
    # past a cosine schedule's end the lr is 0 (PyTorch allows 0 too): the optimizer
    # still copies, pickles and resumes from a checkpoint
    import copy
    import pickle
    ck = str(tmp_path / "ck.npz")
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=3, verbose=0,
          callbacks=[cdl.CosineLR(1), cdl.ModelCheckpoint(ck, save_optimizer=True)])
    assert opt.lr == 0.0 and opt.base_lr == 0.001
    _, back = cdl.load(ck, optimizer=True)
    for twin in (back, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (twin.lr, twin.base_lr) == (0.0, 0.001)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="SGD: lr must be"):
            opt.lr = bad
    assert opt.lr == 0.0


def test_fit_argument_errors():
    x, y = blobs()
    m = tiny()
    opt = cdl.SGD(m, lr=0.1)
    loss = cdl.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        m.fit(x, y, loss, opt, batch_size=0)
    with pytest.raises(ValueError, match="validation_split"):
        m.fit(x, y, loss, opt, validation_split=1.0)
    with pytest.raises(ValueError, match=r"validation_data\[1\] must have shape \(3,\)"):
        m.fit(x, y, loss, opt, validation_data=(x[:3], y[:4]))
    with pytest.raises(TypeError, match="callbacks must be cdl callbacks"):
        m.fit(x, y, loss, opt, callbacks=[print])
    for bad in (cdl.EarlyStopping(), "es", 3):
        with pytest.raises(TypeError, match=r"Sequential.fit: callbacks must be a list of cdl "
                                            rf"callbacks, got {type(bad).__name__}"):
            m.fit(x, y, loss, opt, callbacks=bad)
    assert m.fit(x, y, loss, opt, callbacks=None, verbose=0).epochs == [0]


@pytest.mark.parametrize("schedule", [lambda: cdl.CosineLR(6), lambda: cdl.StepLR(2, 0.5)])
def test_resuming_from_a_checkpoint_with_initial_epoch_is_the_uninterrupted_run(
        tmp_path, schedule):
    x, y = blobs()
    loss = cdl.SoftmaxCrossEntropy()
    whole = tiny()
    opt = cdl.SGD(whole, lr=0.1, momentum=0.9)
    ck = cdl.ModelCheckpoint(str(tmp_path / "ck-{epoch}.npz"), monitor="loss",
                             save_optimizer=True)
    h = whole.fit(x, y, loss, opt, epochs=6, batch_size=16, verbose=0,
                  callbacks=[schedule(), ck])
    resumed, ropt = cdl.load(tmp_path / "ck-3.npz", optimizer=True)
    h2 = resumed.fit(x, y, loss, ropt, epochs=6, batch_size=16, verbose=0, initial_epoch=3,
                     callbacks=[schedule()])
    assert h2.epochs == [3, 4, 5] and h2["lr"] == h["lr"][3:]
    assert h2["loss"] == h["loss"][3:]
    for k, v in whole.state_dict().items():
        np.testing.assert_array_equal(v, resumed.state_dict()[k], err_msg=k)
    for bad in (6, -1, 1.0):
        with pytest.raises(ValueError, match=r"initial_epoch must be an int in \[0, epochs=6\)"):
            resumed.fit(x, y, loss, ropt, epochs=6, verbose=0, initial_epoch=bad)


def test_resuming_with_early_stopping_and_a_best_checkpoint_is_the_uninterrupted_run(tmp_path):
    """Both callbacks used to start afresh: the resumed run stopped later, and its first
    epoch overwrote the best file with a worse model. Given the run's state so far
    (initial_value_threshold, initial_wait) they continue as if never stopped."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 4)).astype(np.float32), rng.integers(0, 3, 60)
    xv, yv = rng.standard_normal((30, 4)).astype(np.float32), rng.integers(0, 3, 30)
    loss = cdl.SoftmaxCrossEntropy()

    def net():
        return cdl.Sequential([cdl.Linear(4, 32), cdl.ReLU(), cdl.Linear(32, 3)], (4,), seed=0)

    kw = dict(epochs=30, batch_size=8, verbose=0, validation_data=(xv, yv))
    whole = net()
    es = cdl.EarlyStopping(patience=3)
    h = whole.fit(x, y, loss, cdl.SGD(whole, lr=0.2, momentum=0.9), **kw, callbacks=[
        es, cdl.ModelCheckpoint(str(tmp_path / "ck-{epoch}.npz"), save_optimizer=True),
        cdl.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True)])
    k = es.stopped_epoch - 1            # resume after epoch k (counted from 1)
    so_far = h["val_loss"][:k]
    best = min(so_far)
    assert h["val_loss"][k] > best      # the first resumed epoch is no better
    best_file = (tmp_path / "best.npz").read_bytes()
    resumed, opt = cdl.load(tmp_path / f"ck-{k}.npz", optimizer=True)
    es2 = cdl.EarlyStopping(patience=3, initial_value_threshold=best,
                            initial_wait=k - 1 - so_far.index(best))
    ck2 = cdl.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True,
                              initial_value_threshold=best)
    h2 = resumed.fit(x, y, loss, opt, **kw, initial_epoch=k, callbacks=[es2, ck2])
    assert h2.epochs == h.epochs[k:] and es2.stopped_epoch == es.stopped_epoch
    assert h2["val_loss"] == h["val_loss"][k:]
    assert ck2.saved == [] and (tmp_path / "best.npz").read_bytes() == best_file
    for key, v in whole.state_dict().items():
        np.testing.assert_array_equal(v, resumed.state_dict()[key], err_msg=key)


def test_callbacks_initial_state_is_checked():
    for make in (cdl.EarlyStopping, lambda **kw: cdl.ModelCheckpoint("m.npz", **kw)):
        for value, exc, match in (("1", TypeError, r"must be a number, got '1'"),
                                  (True, TypeError, r"must be a number, got True"),
                                  (float("nan"), ValueError, r"must be a finite number, got nan")):
            with pytest.raises(exc, match=rf"(EarlyStopping|ModelCheckpoint): "
                                          rf"initial_value_threshold {match}"):
                make(initial_value_threshold=value)
    with pytest.raises(ValueError, match=r"EarlyStopping: initial_wait must be >= 0, got -1"):
        cdl.EarlyStopping(initial_wait=-1)
    es = cdl.EarlyStopping(monitor="val_accuracy", initial_value_threshold=0.5, initial_wait=2)
    es.on_train_begin()
    assert (es.best, es.wait, es.mode) == (0.5, 2, "max")


def test_fit_refuses_empty_validation_data_and_both_validation_arguments():
    """Empty validation_data used to be dropped silently (evaluate refuses it), and
    validation_split was ignored beside validation_data; both are refused before
    anything trains."""
    x, y = blobs()
    m = tiny()
    opt = cdl.SGD(m, lr=0.1)
    loss = cdl.SoftmaxCrossEntropy()
    before = m.state_dict()
    with pytest.raises(ValueError, match=r"Sequential.fit: validation_data is empty "
                                         r"\(validation_data\[0\] has shape 0x4\)"):
        m.fit(x, y, loss, opt, verbose=0, validation_data=(x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"Sequential.fit: give validation_data or "
                                         r"validation_split, not both \(got "
                                         r"validation_split=0.5 with validation_data\)"):
        m.fit(x, y, loss, opt, verbose=0, validation_data=(x, y), validation_split=0.5)
    assert opt.steps == 0
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    h = m.fit(x, y, loss, opt, verbose=0, validation_data=(x, y), validation_split=0.0)
    assert len(h["val_loss"]) == 1


def test_an_optimizer_named_like_a_builtin_never_replaces_it():
    """A user's optimizer class named like a built-in took its name in OPTIMIZER_TYPES:
    every later load of a file (or unpickling) holding a cdl.SGD built the user's class.
    It now gets a type name of its own ("<module>.<qualname>"), as layers do."""
    import pickle
    m = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=0)
    builtin = cdl.SGD(m, lr=0.1, momentum=0.9)
    file, pickled = cdl.dumps(m, optimizer=builtin), pickle.dumps(builtin)

    class SGD(cdl.Optimizer):
        """The user's own plain SGD, unrelated to cdl's."""

        def _bind(self):
            pass

        def _update(self, nt):
            self.pack.params -= self.lr * self.pack.grads

    own = f"{__name__}.{SGD.__qualname__}"
    zed = own[:-len("SGD")] + "Zed"     # (the other user class below)
    types = cdl.optim.OPTIMIZER_TYPES
    try:
        assert types["SGD"] is cdl.SGD and types[own] is SGD and SGD.type_name == own
        for _, back in (cdl.loads(file, optimizer=True), (None, pickle.loads(pickled)),
                        cdl.loads(cdl.dumps(m, optimizer=builtin), optimizer=True),
                        (None, pickle.loads(pickle.dumps(builtin)))):
            assert type(back) is cdl.SGD and back.momentum == 0.9
        mine = SGD(m, lr=0.25)
        mine.steps = 3
        assert mine.state_dict()["type"] == own
        for _, back in (cdl.loads(cdl.dumps(m, optimizer=mine), optimizer=True),
                        (None, pickle.loads(pickle.dumps(mine)))):
            assert type(back) is SGD and (back.lr, back.steps) == (0.25, 3)
        with pytest.raises(ValueError, match=rf"the state is of a {re.escape(own)}, not a SGD"):
            cdl.SGD(m, lr=0.1).load_state_dict(mine.state_dict())

        class SGD(cdl.Optimizer):       # noqa: F811 (a notebook cell run again)
            pass

        assert types[own] is SGD and types["SGD"] is cdl.SGD
        # a built-in defined after a user's class of its name takes the name back
        class Zed(cdl.SGD):
            pass

        later = type("Zed", (cdl.SGD,), {"__module__": "cdl.optim.zed"})
        assert types["Zed"] is later and types[zed] is Zed and Zed.type_name == zed
    finally:
        for key in (own, zed, "Zed"):
            types.pop(key, None)
