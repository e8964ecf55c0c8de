#!/usr/bin/env python
"""Smoke test of an installed cdl wheel: run it with the interpreter of a fresh virtual
environment into which only the wheel (and its dependencies) were installed, from a
folder outside the source tree.

Checks: the package imports from site-packages (not from a checkout), the distribution
metadata (name cdl-cpu, version = cdl.__version__, SPDX licence MIT, LICENSE file),
cdl.show_config(), every instruction-set build this CPU supports imports, the bundled
OpenMP runtime is the wheel's own, a short training run learns, save/load round-trips,
and the `cdl` command answers --version. Exits non-zero on the first failure.
"""
import os
import subprocess
import sys
import tempfile


def check(cond, what):
    if not cond:
        print(f"smoke test FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    import numpy as np
    import cdl

    where = os.path.dirname(cdl.__file__)
    check("site-packages" in where, f"cdl imported from an installation ({where})")

    from importlib import metadata
    dist = metadata.distribution("cdl-cpu")
    check(dist.version == cdl.__version__, f"distribution cdl-cpu {dist.version} is cdl "
                                           f"{cdl.__version__}")
    meta = dist.metadata
    check(meta.get("License-Expression") == "MIT", "License-Expression: MIT")
    files = [str(f) for f in (dist.files or [])]
    check(any(f.endswith("licenses/LICENSE") for f in files), "LICENSE in the dist-info")

    cdl.show_config()
    from cdl._kernels import _dispatch
    import importlib
    for isa in _dispatch.SUPPORTED:
        for mod in ("_conv", "_dense", "_pool", "_elementwise"):
            importlib.import_module(f"cdl._kernels.{mod}_{isa}")
    check(True, f"kernel builds import for {', '.join(_dispatch.SUPPORTED)}")
    if sys.platform.startswith("linux"):
        maps = open("/proc/self/maps").read()
        gomp = sorted({line.split()[-1] for line in maps.splitlines() if "libgomp" in line})
        check(gomp and all("site-packages" in g for g in gomp),
              f"OpenMP runtime bundled in the wheel ({', '.join(gomp) or 'none loaded'})")

    # a short training run: two classes of 6x6 images, a bright bar on the left or right
    rng = np.random.default_rng(0)
    n = 256
    y = rng.integers(0, 2, n)
    x = rng.random((n, 1, 6, 6), dtype=np.float32) * 0.3
    x[y == 0, 0, :, 1] += 1.0
    x[y == 1, 0, :, 4] += 1.0
    model = cdl.Sequential([cdl.Conv2d(1, 4, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                            cdl.Flatten(), cdl.Linear(4 * 3 * 3, 2)], (1, 6, 6), seed=0)
    loss = cdl.SoftmaxCrossEntropy()
    hist = model.fit(x[:192], y[:192], loss, cdl.SGD(model, lr=0.1, momentum=0.9), epochs=5,
                     batch_size=16, verbose=0)
    _, acc = model.evaluate(x[192:], y[192:], loss)
    check(hist.history["loss"][-1] < hist.history["loss"][0] and acc >= 0.9,
          f"training learns (loss {hist.history['loss'][0]:.3f} -> "
          f"{hist.history['loss'][-1]:.3f}, held-out accuracy {acc:.2f})")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.npz")
        model.save(path)
        same = cdl.load(path)
        check(np.array_equal(same.predict(x), model.predict(x)), "save/load round trip")

    exe = os.path.join(os.path.dirname(sys.executable), "cdl")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    check(r.returncode == 0 and r.stdout.startswith(f"cdl {cdl.__version__}"),
          f"`cdl --version`: {r.stdout.strip()}")
    print("smoke test passed")


if __name__ == "__main__":
    main()
