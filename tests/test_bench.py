"""bench.py runs (tiny sizes, one round): its numbers are measured and written up, never asserted.
What is asserted is that the cut-down steps of the breakdown compute what the MoE computes, and that
gpu-check's checks pass on a CPU, where they run what a CPU can."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim import optimizer

from model import GPTConfig, MoE

from dev import bench
from dev import op_times
from dev import profile_parts
from dev import reference_gpt
from tests.conftest import refused

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args):
    r = subprocess.run([sys.executable, str(ROOT / "dev" / "bench.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]  # a failed gpu-check says which on stdout
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
    assert [c["status"] for c in checks.values()] == ["PASS"] * 5  # two gloo ranks stand in for NCCL


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
                "--batch_seqs=4", "--rounds=1", "--compile=false", f"--json={tmp_path / 'step.json'}")
    assert "MoE MFU / dense MFU" in out and "measured 4096² fp32 matmul rate" in out and "M_exec" in out
    result = json.loads((tmp_path / "step.json").read_text())  # the whole result replaces the partial ones
    assert set(result["models"]) == {"dense", "moe"} and "partial" not in result and "sample" not in out


TINY_MOE = '[model]\nscheme = "1dense"\nL = 2\nDm = 32\nH = 2\nDffn = 64\nE = 4\nK = 2\nDe = 16\nDse = 16\nS = 32\n'


def test_parts_attribute_backward_ops_to_their_forward_part(tiny_data, tmp_path):
    # a backward op goes to the part whose forward op made its autograd node; the parts add up to the step
    import train
    from tests.conftest import TINY_MODEL
    originals = {name: getattr(owner, name) for owner, name, _ in profile_parts.SCOPES}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with profile_parts.part_scopes((prof, 2, 3)) as walls:
        train.train(TINY_MODEL + [f"--data={tiny_data}", f"--out_dir={tmp_path / 'r'}", "--iters=3", "--batch_seqs=2",
                                  "--eval_tokens=64", "--sample_tokens=0", "--eval_interval=3"])
    assert {name: getattr(owner, name) for owner, name, _ in profile_parts.SCOPES} == originals  # put back
    assert len(walls[profile_parts.STEP]) == 3 and len(walls["checkpoint save"]) == 1
    events = prof.events()
    parts = profile_parts.attribute(events)
    steps = [e for e in events if e.name == profile_parts.PART + profile_parts.STEP]
    assert len(steps) == 2
    inside = sum(us for p, us in parts.items() if p in profile_parts.IN_STEP)
    assert inside == pytest.approx(sum(e.cpu_time_total for e in steps), rel=0.02)
    owner, found = profile_parts.owners(events), {}
    for e in events:  # where the kernels of each kind went
        found.setdefault(e.name, set()).add(owner[e.id])
    assert found["aten::_scaled_dot_product_flash_attention_for_cpu_backward"] == {"attention"}
    assert found["aten::_log_softmax_backward_data"] == {"LM head and loss"}
    assert found["aten::topk"] == {"router"}
    assert found["aten::silu_backward"] == {"routed experts", "SwiGLU FFNs"}  # the experts and the dense layer
    assert found["aten::embedding_dense_backward"] == {profile_parts.STEP}
    assert {"router", "routed experts", "SwiGLU FFNs", "optimizer"} <= set(parts)


@pytest.mark.parametrize("L,Dm,H,Dffn", [(4, 256, 8, 800), (2, 96, 3, 264)])
def test_reference_has_the_dense_models_matrices(L, Dm, H, Dffn):
    # the nanoGPT-style model's GELU MLP of width 1.5·Dffn has the SwiGLU's matmul parameters: equal FLOPs per token
    import flops
    shape = flops.Shape(scheme="dense", L=L, Dm=Dm, H=H, Dffn=Dffn, S=64)
    ref = reference_gpt.ReferenceGPT(shape, 256)
    assert ref.matmul_params() == flops.count(shape).Na == flops.count(shape).N
    idx = torch.randint(0, 256, (2, 64))
    logits, loss, _ = ref(idx, idx)
    assert logits.shape == (2, 64, 256) and torch.isfinite(loss)


@pytest.mark.slow
def test_parts_and_nanogpt_benches_run(tiny_data, tmp_path):
    (tmp_path / "moe.toml").write_text(TINY_MOE)
    out = run_bench("parts", str(tmp_path / "moe.toml"), f"--data={tiny_data}", "--steps=4", "--warmup=1",
                    f"--json={tmp_path / 'p.json'}")
    for part in ("attention", "router", "routed experts", "LM head and loss", "optimizer", "loader", "logging",
                 "evaluation", "checkpoint save", "sample", "start-up"):
        assert f"  {part}" in out
    shares = json.loads((tmp_path / "p.json").read_text())["parts"]
    assert sum(p["share"] for p in shares.values()) == pytest.approx(1.0)
    out = run_bench("nanogpt", f"--moe={tmp_path / 'moe.toml'}", f"--data={tiny_data}", "--batch_seqs=2", "--rounds=2",
                    "--warmup=1", "--by_op=2", f"--json={tmp_path / 'n.json'}")
    assert "dense twin / nanoGPT-style, FLOP/s" in out and "MoE / dense twin, tokens/s" in out
    by_op = json.loads((tmp_path / "n.json").read_text())["ms_by_op"]
    assert set(by_op) == {"nanoGPT-style", "dense twin", "MoE"} and "gmm" in by_op["MoE"] and "gmm" not in by_op["dense twin"]
    assert "gelu" in by_op["nanoGPT-style"] and "silu" in by_op["dense twin"] and "  GEMM  " in out


def test_op_times_count_each_op_of_a_step_by_name_and_the_optimizers_apart(capsys):
    a, w = torch.randn(64, 64), torch.randn(64, 64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, foreach=False)  # param.add_(grad) per tensor

    def step():
        torch.relu(a @ w).sum().backward()
        opt.step()
        opt.zero_grad()
        (a * 2).sum()  # after the step: not the optimizer's
    hooks = [len(optimizer._global_optimizer_pre_hooks), len(optimizer._global_optimizer_post_hooks)]
    by_op = op_times.ms_by_op({"step": step}, 3)["step"]
    assert {"mm", "relu", "sum", "threshold_backward", "optimizer:add_", "mul"} <= set(by_op)
    assert "add_" not in by_op and "optimizer:mul" not in by_op
    assert [len(optimizer._global_optimizer_pre_hooks), len(optimizer._global_optimizer_post_hooks)] == hooks  # removed
    assert all(v > 0 for v in by_op.values())
    op_times.print_by_op({"x": by_op, "y": {"mm": 1.0, "_scaled_dot_product_flash_attention_for_cpu": 2.0}}, top=100)
    rows = {r[:30].strip(): r[30:].split() for r in capsys.readouterr().out.splitlines()[2:]}
    assert rows["GEMM"] == [f"{by_op['mm']:.2f}", "1.00"] and rows["attention"] == ["0.00", "2.00"]
    assert rows["optimizer step"] == [f"{by_op['optimizer:add_']:.2f}", "0.00"]
    assert rows["relu"] == [f"{by_op['relu']:.2f}", "0.00"] and "optimizer:add_" not in rows
    op_times.print_by_op({"x": by_op}, top=1)  # the kinds, then the one slowest element-wise op
    assert len(capsys.readouterr().out.splitlines()) == 2 + len(op_times.OP_KINDS) + 1


def test_op_times_refuse_compiled_steps(capsys):
    err = refused(bench.main, ["nanogpt", "--by_op=2", "--compile=true"], capsys)
    assert "--by_op=2: times eager CPU ops" in err


@pytest.mark.slow
def test_versions_bench_runs_checkouts_in_turn(tiny_data, tmp_path):
    (tmp_path / "moe.toml").write_text(TINY_MOE)
    out = run_bench("versions", str(ROOT), str(ROOT), f"--config={tmp_path / 'moe.toml'}", f"--data={tiny_data}",
                    "--iters=2", "--batch_seqs=2", "--eval_tokens=64", "--rounds=1")
    assert out.count(str(ROOT)) == 2 and f"over {ROOT.name}: 1.000" in out
    r = subprocess.run([sys.executable, str(ROOT / "dev" / "bench.py"), "versions", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and f"{tmp_path}: no train.py" in r.stderr and "Traceback" not in r.stderr
