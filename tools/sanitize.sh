#!/usr/bin/env bash
# Build cdl's extension modules with AddressSanitizer (+ UBSan) into a separate
# venv and run the property tests (every kernel over random and edge shapes) and
# the bad-input tests under it. Not part of the default CI: the ASan build is slow.
#
#   tools/sanitize.sh                 # ASan + UBSan, property + bad-input tests
#   SANITIZE_TESTS="tests/test_properties.py" tools/sanitize.sh
#   VENV=/tmp/venv-asan BUILD=/tmp/build-asan tools/sanitize.sh
#
# Python itself "leaks" by design (interned objects, arenas), so leak detection
# is off (detect_leaks=0); any out-of-bounds read/write, use-after-free or
# undefined behaviour in a kernel aborts the run with a report.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-/tmp/venv-cdl-asan}"
BUILD="${BUILD:-/tmp/build-cdl-asan}"
TESTS="${SANITIZE_TESTS:-tests/test_properties.py tests/test_bad_input.py}"
FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q scikit-build-core cython cython-cmake scipy numpy threadpoolctl \
      pytest hypothesis
fi
"$VENV/bin/pip" install -q --no-build-isolation -Cbuild-dir="$BUILD" \
    -Ccmake.define.CMAKE_C_FLAGS="$FLAGS" \
    -Ccmake.define.CMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" "$ROOT"

ASAN_LIB="$(gcc -print-file-name=libasan.so)"
UBSAN_LIB="$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
cd /tmp  # test the installed package, not the source tree
SUPPORTED="$("$VENV/bin/python" -c "import cdl._kernels._runtime as r; print(' '.join(r.cpu_supports()))")"
ran=0
for isa in ${SANITIZE_ISAS:-avx512 avx2 baseline}; do
  case " $SUPPORTED " in
    *" $isa "*) ;;
    *) echo "== skipping ISA $isa (this CPU supports: $SUPPORTED)"; continue ;;
  esac
  echo "== ISA $isa"
  CDL_ISA="$isa" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
      $(for t in $TESTS; do echo "$ROOT/$t"; done)
  ran=$((ran + 1))
done
[ "$ran" -gt 0 ] || { echo "sanitizer run: no ISA was tested" >&2; exit 1; }
echo "sanitizer run: clean ($ran instruction-set builds)"
