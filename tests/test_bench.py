"""bench.py runs (tiny sizes, one round): its numbers are measured and written up, never asserted."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(*args):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_expert_bench_runs():
    out = bench("expert", "--T=64", "--Dm=32", "--E=4", "--K=2", "--De=16", "--Dse=16", "--rounds=1", "--compile=false")
    assert "dense/MoE  median of per-round ratios" in out and "GFLOP/s" in out


def test_step_bench_runs(tiny_data, tmp_path):
    moe, dense = tmp_path / "moe.toml", tmp_path / "dense.toml"
    moe.write_text('[model]\nscheme = "1dense"\nL = 2\nDm = 32\nH = 2\nDffn = 64\nE = 4\nK = 2\nDe = 16\nDse = 16\nS = 32\n')
    dense.write_text('[model]\nscheme = "dense"\nL = 2\nDm = 32\nH = 2\nDffn = 160\nS = 32\n')
    out = bench("step", f"--moe={moe}", f"--dense={dense}", f"--data={tiny_data}", "--iters=6", "--log_interval=2",
                "--batch_seqs=4", "--rounds=1", "--compile=false")
    assert "MoE MFU / dense MFU" in out and "measured 4096² fp32 matmul rate" in out
