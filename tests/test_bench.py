"""bench.py runs (tiny sizes, one round): its numbers are measured and written up, never asserted.
What is asserted is that the cut-down steps of the breakdown compute what the MoE computes, and that
gpu-check's checks pass on a CPU, where they run what a CPU can."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
from model import GPTConfig, MoE

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_expert_bench_runs(tmp_path):
    out = run_bench("expert", "--T=64", "--Dm=32", "--E=4", "--K=2", "--De=16", "--Dse=16", "--rounds=1", "--warmup=1",
                    "--compile=false", "--breakdown", f"--json={tmp_path / 'e.json'}")
    assert "dense/MoE  median of per-round ratios" in out and "TFLOP/s" in out
    assert "fixed routing" in out and "sort, dispatch and combine" in out
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["median_ms"]) == {"dense", "MoE", "fixed routing", "GEMMs only"} and result["dense_over_moe"] > 0


@pytest.mark.slow
def test_attention_bench_runs():
    out = run_bench("attention", "--B=1", "--H=3", "--S=64", "--Dh=16", "--rounds=1", "--warmup=1", "--compile=false")
    assert "forward only" in out  # no FlexAttention backward on a CPU
    for name in ("flex + ALiBi", "SDPA + ALiBi bias", "flex causal", "SDPA causal"):
        assert f"  {name} " in out


@pytest.mark.slow
def test_profile_runs():
    out = run_bench("profile", "--batch_seqs=2", "--steps=1", "--warmup=1", "--compile=false", "--top=3")
    assert "top kernels:" in out and "GEMM" in out and "grouped GEMM (experts)" in out


@pytest.mark.slow
def test_gpu_check_passes_on_cpu(tmp_path):
    out = run_bench("gpu-check", "--compile=false", f"--json={tmp_path / 'g.json'}")
    assert "gpu-check: all checks passed" in out
    checks = json.loads((tmp_path / "g.json").read_text())["checks"]
    assert [c["status"] for c in checks.values()] == ["PASS"] * 4  # two gloo ranks stand in for NCCL


@pytest.mark.parametrize("Dse", [0, 16])
def test_breakdown_parts_compute_the_moe_loss(Dse):
    # Σ_t y_t·dy_t = Σ_slots o_s·dy_tok(s): without the router and before combine, the same loss and gradients
    torch.manual_seed(0)
    moe = MoE(GPTConfig(scheme="full", L=1, Dm=32, H=1, E=6, K=2, De=16, Dse=Dse))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    x, dy = torch.randn(40, 32, requires_grad=True), torch.randn(40, 32)
    fixed, gemms, _ = bench.moe_parts(moe, x, dy)
    y, _ = moe(x)
    full = (y * dy).sum()
    w_grads = [torch.autograd.grad(loss, moe.w13)[0] for loss in (full, fixed(), gemms())]
    assert torch.allclose(fixed(), full, rtol=1e-5) and torch.allclose(gemms(), full, rtol=1e-5)
    assert torch.allclose(w_grads[1], w_grads[0], atol=1e-6) and torch.allclose(w_grads[2], w_grads[0], atol=1e-6)


@pytest.mark.slow
def test_step_bench_runs(tiny_data, tmp_path):
    moe, dense = tmp_path / "moe.toml", tmp_path / "dense.toml"
    moe.write_text('[model]\nscheme = "1dense"\nL = 2\nDm = 32\nH = 2\nDffn = 64\nE = 4\nK = 2\nDe = 16\nDse = 16\nS = 32\n')
    dense.write_text('[model]\nscheme = "dense"\nL = 2\nDm = 32\nH = 2\nDffn = 160\nS = 32\n')
    out = run_bench("step", f"--moe={moe}", f"--dense={dense}", f"--data={tiny_data}", "--iters=6", "--log_interval=2",
                "--batch_seqs=4", "--rounds=1", "--compile=false")
    assert "MoE MFU / dense MFU" in out and "measured 4096² fp32 matmul rate" in out and "M_exec" in out
