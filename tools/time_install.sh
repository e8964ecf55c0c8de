#!/usr/bin/env bash
# Times what a new user waits for, from a fresh clone of this checkout in a fresh
# virtual environment: the README's first command's install (everything compiles),
# its second command's install (the persistent build folder: nothing recompiles) and
# a rebuild after touching one .pyx. Usage: tools/time_install.sh [WORKDIR]
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
rm -rf "$WORK/cdl" "$WORK/venv"
git clone -q "$SRC" "$WORK/cdl"
cd "$WORK/cdl"
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
timed() {
  local label=$1; shift
  local s e
  s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N)
  printf '| %s | %.0f s | %s |\n' "$label" "$(echo "$e - $s" | bc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
}
echo "$(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), $(date -u '+%Y-%m-%d %H:%M UTC'); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| step | time | load average after (1, 5, 15 min) |"
echo "|---|--:|---|"
timed 'first install: pip install ".[data,plot]"' pip install -q ".[data,plot]"
timed 'second command: pip install ".[test]"' pip install -q ".[test]"
echo "# touched" >> src/cdl/_kernels/_pool.pyx
timed 'rebuild after touching _pool.pyx: pip install . --no-deps' pip install -q . --no-deps
