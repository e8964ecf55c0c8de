"""bench/bench_peak.py runs end to end (--quick): its checks pass (fused = unfused bit for
bit, every contender agrees) and it prints its tables. No timings are asserted."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_peak_quick_runs(tmp_path):
    cmd = [sys.executable, str(BENCH / "bench_peak.py"), "--quick", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "FMA peak" in out
    assert "| shape | before ms | after ms | GFLOP/s | % of FMA peak |" in out
    assert "| first layer C3->K32 32x32 3x3 p1, N=4" in out
    assert "| dense N=16 64->32 |" in out
