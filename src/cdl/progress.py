"""A dependency-free progress bar for ``fit``, written to stderr.

On a terminal it redraws one line (at most ten times a second); otherwise it
prints one plain line per epoch so logs stay readable.
"""
import sys
import time

__all__ = ["ProgressBar"]


def _fmt_time(s):
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s}s"


class ProgressBar:
    def __init__(self, total, epoch, epochs, file=None, width=24, start=None):
        self.total = int(total)
        self.prefix = f"Epoch {epoch}/{epochs}"
        self.file = sys.stderr if file is None else file
        self.width = width
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.start = time.perf_counter() if start is None else start
        self._last_draw = 0.0

    def _line(self, done, metrics):
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else float("nan")
        # an undefined accuracy ("acc", "accuracy", "val_accuracy" NaN: no class labels)
        # is left out; a NaN loss is shown
        parts = [f"{k} {v:.4f}" for k, v in metrics.items() if v == v or "acc" not in k]
        if done < self.total:
            filled = int(self.width * done / max(self.total, 1))
            bar = "=" * filled + ">" + "." * (self.width - filled - 1)
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            tail = f"{rate:,.0f} samples/s  ETA {_fmt_time(eta)}"
        else:
            bar = "=" * self.width
            tail = f"{rate:,.0f} samples/s  {_fmt_time(elapsed)}"
        return f"{self.prefix} [{bar}] {done}/{self.total}  " + "  ".join(parts) + "  " + tail

    def update(self, done, metrics):
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.1 and done < self.total:
            return
        self._last_draw = now
        self.file.write("\r" + self._line(done, metrics) + "\033[K")
        self.file.flush()

    def finish(self, done, metrics):
        line = self._line(done, metrics)
        self.file.write(("\r" + line + "\033[K\n") if self.tty else line + "\n")
        self.file.flush()
