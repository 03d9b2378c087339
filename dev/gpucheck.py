"""The GPU smoke test: every CUDA path of the project against its reference.

    python dev/gpucheck.py [--device=cuda:N] [--compile=false] [--json=PATH]  # run first on a new GPU box
    python dev/gpucheck.py --device=cpu    # what a CPU can: no FlexAttention backward, gloo for two ranks
    python dev/bench.py gpu-check          # the same checks, with bench.py's --threads and --malloc

Exit code 0 when every check passes, 1 when one fails, 2 when it cannot start (no CUDA device here, a
bad flag). It needs nothing of bench.py: bench.py imports it, never the other way round.
"""
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's root, for python dev/gpucheck.py
from harness import interrupts  # first: Ctrl-C while torch loads ends in one line, not a traceback
from harness import helptext
from harness import rundir
if __name__ == "__main__":
    interrupts.quit_while_starting("gpucheck.py")

import torch
import torch.nn.functional as F

import data
from model import (GPT, GPTConfig, MoE, alibi_bias, alibi_score_mod, alibi_slopes, attend, causal_block_mask,
                   flex_attention, flex_attention_compiled, flex_length)
from kernels.custom_ops import expert_path
import train  # its training step: the one that check_training checks

from harness import parallel
from harness import safe_io
from harness.parallel import device_name, parse_device

RESULT_COMMANDS = ("dev/bench.py", "dev/gpucheck.py", "bench.py", "gpucheck.py")  # a --json file that may be replaced: one of these wrote it (older files name them without dev/)


def keeper(path, command):
    """keep(result): what a long check or benchmark has measured so far, written to `path` (--json; nothing
    when None) after each piece with "partial": true, so that a part cut off by a time cap keeps it. The
    caller writes the whole result last."""
    def keep(result):
        if path:
            safe_io.write_text(path, json.dumps({"command": command, "partial": True, **result}, indent=1))
    return keep


def rel(a, b):
    """‖a − b‖ / ‖b‖ over all elements, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_expert_path(device, compile):
    """The fused expert path against the loop over experts (MoE.forward_loop), both under bf16 autocast
    so that they route alike: outputs, balance loss and every gradient; compiled against eager over
    two batches that route differently, with no recompilation."""
    torch.manual_seed(0)
    moe = MoE(GPTConfig(scheme="full", L=1, Dm=256, H=2, E=16, K=4, De=128, Dse=128)).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    params = list(moe.parameters())

    def run(f, x, dy, bf16=True):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            y, aux = f(x)
        return y.float(), aux.load.float(), torch.autograd.grad((y.float() * dy).sum() + aux.balance, [x] + params)
    x = torch.randn(4096, 256, device=device, requires_grad=True)
    dy = torch.randn(4096, 256, device=device)
    y, counts, g = run(moe, x, dy)
    y_loop, counts_loop, g_loop = run(moe.forward_loop, x, dy)
    y32, _, g_loop32 = run(moe.forward_loop, x, dy, bf16=False)
    errs = {"out": rel(y, y_loop), "grads (worst)": max(rel(a, b) for a, b in zip(g, g_loop))}
    ok = torch.equal(counts, counts_loop) and errs["out"] < 1e-2 and errs["grads (worst)"] < 2e-2
    detail = (f"T=4096 E=16 K=4 bf16 ({expert_path(device, torch.bfloat16)[0]}): same routing "
              f"{torch.equal(counts, counts_loop)}, rel err vs loop: out {errs['out']:.1e}, grads "
              f"{errs['grads (worst)']:.1e} (fp32 loop: out {rel(y, y32):.1e})")
    # fp32, the other expert path on a GPU (expert_path): against the fp32 loop
    y_fp32, _, g_fp32 = run(moe, x, dy, bf16=False)
    fp32_err = max([rel(y_fp32, y32)] + [rel(a, b) for a, b in zip(g_fp32, g_loop32)])
    ok &= fp32_err < 1e-4
    detail += f"; fp32 ({expert_path(device, torch.float32)[0]}) vs loop {fp32_err:.1e}"
    if compile:
        from torch._dynamo.utils import counters
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(moe, fullgraph=True)
        worst = 0.0
        for i in range(2):
            xi = (torch.randn(4096, 256, device=device) * (i + 1)).requires_grad_()
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                yc, cc, gc = run(compiled, xi, dy)
            ye, ce, ge = run(moe, xi, dy)
            ok &= torch.equal(cc, ce)
            worst = max([worst, rel(yc, ye)] + [rel(a, b) for a, b in zip(gc, ge)])
        ok &= worst < 1e-2 and counters["stats"]["unique_graphs"] == 1
        detail += f"; compiled vs eager {worst:.1e}, {counters['stats']['unique_graphs']} graph for 2 routings"
    return ok, detail


def check_attention(device):
    """ALiBi through FlexAttention (score_mod + causal block mask) and through SDPA with the bias, both
    in bf16, against SDPA in fp32, with H no power of two. Two lengths apart: S = 1024, a multiple of
    FlexAttention's 128-wide blocks, and S = 1000, which the model pads to 1024 (model.attend; unpadded,
    such lengths give NaN gradients upstream, pytorch/pytorch#153799: reported, not judged)."""
    details, ok = [], True
    for S in (1024, 1000):
        errs, raw_finite = attention_errors(device, S)
        ok &= all(math.isfinite(e) and e < 1e-2 for e in errs.values())
        details.append(f"S={S}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
                       + ("" if raw_finite is None else f"; unpadded flex finite: {raw_finite}"))
    what = "output and gradients" if device.type == "cuda" else "output (no FlexAttention backward on CPU)"
    return ok, f"H=12 Dh=64 bf16, worst rel err vs fp32 SDPA over {what}: " + "; ".join(details)


def attention_errors(device, S):
    """Worst relative errors of the model's FlexAttention path (model.attend) and of SDPA with a bf16 bias
    against fp32 SDPA at length S; and, at a length off the blocks, whether unpadded flex stays finite."""
    torch.manual_seed(S)
    B, H, Dh = (2 if device.type == "cuda" else 1), 12, 64
    backward = device.type == "cuda"
    q, k, v = (torch.randn(B, H, S, Dh, device=device, requires_grad=backward) for _ in range(3))
    dy = torch.randn(B, H, S, Dh, device=device)
    bias = alibi_bias(torch.tensor(alibi_slopes(H), device=device), S, torch.float32)
    flex = flex_attention_compiled() if device.type == "cuda" else flex_attention

    def run(f, dtype):
        qd, kd, vd = (t.to(dtype) for t in (q, k, v))
        y = f(qd, kd, vd).float()
        return y, (torch.autograd.grad((y * dy).sum(), (q, k, v)) if backward else ())

    def worst(y, g):
        return max([rel(y, ref)] + [rel(a, b) for a, b in zip(g, g_ref)])
    ref, g_ref = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=bias), torch.float32)
    mask = causal_block_mask(flex_length(S), device)
    errs = {"flex": worst(*run(lambda *t: attend(*t, mask, alibi_score_mod(H)), torch.bfloat16)),
            "SDPA with a bf16 bias": worst(*run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=bias.bfloat16()),
                                                torch.bfloat16))}
    raw_finite = None
    if S != flex_length(S):
        y, g = run(lambda *t: flex(*t, score_mod=alibi_score_mod(H), block_mask=causal_block_mask(S, device)),
                   torch.bfloat16)
        raw_finite = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(t).all()) for t in g)
    return errs, raw_finite


def check_router_precision(device):
    """The router runs in fp32 under bf16 autocast (MoE.route), and fp32 means fp32: its logits against an
    fp64 reference to fp32's precision. TF32 (10 mantissa bits) would be off by about 1e-3."""
    torch.manual_seed(0)
    moe = MoE(GPTConfig(scheme="full", L=1, Dm=1024, H=2, E=64, K=4, De=64)).to(device)
    x = torch.randn(4096, 1024, device=device)
    with torch.autocast(device.type, torch.bfloat16):
        s, _, _, _ = moe.route(x)
    z64 = x.double() @ moe.router.weight.double().t()
    err = rel(s, torch.softmax(z64, -1))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return err < 1e-5, f"Dm=1024 E=64 under bf16 autocast: gate scores vs fp64 rel err {err:.1e}; TF32 matmuls {'on' if tf32 else 'off'}"


def check_training(device, compile):
    """A dense and an MoE GPT trained for 30 steps (12 on a CPU) of train.py's own step (train.train_step: bf16 autocast
    on CUDA, the blocks compiled, clipping): eager and compiled give the same first loss, the loss falls,
    and nothing recompiles once the first step has been traced."""
    from torch._dynamo.utils import counters
    attention = "flex" if device.type == "cuda" else "sdpa"
    autocast = parallel.autocast_for(device, "bfloat16" if device.type == "cuda" else "float32")  # as train.py
    steps = 30 if device.type == "cuda" else 12  # on a CPU, what it can in a test's time: 4 sequences, 12 steps
    details, ok = [], True
    for scheme in ("dense", "1dense"):
        torch.manual_seed(0)
        cfg = GPTConfig(scheme=scheme, L=4, Dm=256, H=4, Dffn=704, E=16, K=2, De=64, Dse=128, S=256, vocab_size=512)
        model = GPT(cfg, attention).to(device)
        idx = torch.randint(0, 512, (8 if device.type == "cuda" else 4, 257), device=device)
        with torch.no_grad(), autocast:
            eager_loss = model(idx[:, :-1], idx[:, 1:])[1].item()
        torch._dynamo.reset()
        counters.clear()
        fwd = model.compile_regions() if compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=device.type == "cuda")
        step_ctx = train.Step(model=model, fwd=fwd, optimizer=opt, autocast=autocast, device=device)
        rows = idx.cpu().numpy()
        batches = [(rows[:, :-1], rows[:, 1:])]  # one micro-batch, as the loader hands it to train.py's step
        losses, t0 = [], None
        for step in range(steps):
            if step == 1:
                graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
            sums = train.train_step(step_ctx, batches)[0]  # loss, CE, balance and z-loss
            losses.append(sums[0].item())
        ms = (time.perf_counter() - t0) / (steps - 1) * 1e3
        recompiled = counters["stats"]["unique_graphs"] - graphs
        good = (all(map(math.isfinite, losses)) and abs(losses[0] / eager_loss - 1) < 1e-2
                and losses[-1] < losses[0] - 1.0 and recompiled == 0)
        ok &= good
        details.append(f"{scheme}, {steps} steps: loss {losses[0]:.3f} (eager {eager_loss:.3f}) -> {losses[-1]:.3f}, "
                       f"{recompiled} recompiles, {ms:.1f} ms/step")
    return ok, f"{attention}{' compiled' if compile else ''}; " + "; ".join(details)


def check_two_ranks(device):
    """train.py on two ranks, DDP and FSDP (NCCL on GPUs, gloo on CPU), against one process, same global batch."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return None, f"{torch.cuda.device_count()} GPU here: needs two"
    with tempfile.TemporaryDirectory() as tmp:
        text = "".join(f"{i} the king and {i * 7 % 13} the queen of {i % 5} the sea.\n" for i in range(20000))
        with contextlib.redirect_stdout(None):
            data.prepare(f"{tmp}/data", {"train": [(text, True)], "val": [(text[:20000], True)]}, "byte", workers=1)
        argv = ["--L=2", "--Dm=64", "--H=2", "--Dffn=176", "--E=8", "--K=2", "--De=32", "--Dse=64", "--S=64",
                f"--data={tmp}/data", "--iters=10", "--batch_seqs=8", "--log_interval=1", "--eval_interval=10",
                "--eval_tokens=4096", f"--device={device.type}", "--dtype=float32"]
        losses = {}
        for n, out in ((1, "one"), (2, "ddp"), (2, "fsdp")):
            launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if n > 1 else [])
            r = subprocess.run(launch + [str(Path(__file__).resolve().parent.parent / "train.py")] + argv
                               + [f"--out_dir={tmp}/{out}"] + ([f"--parallel={out}"] if n > 1 else []),
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if r.returncode:
                return False, f"{out}: exit {r.returncode}: {r.stderr.strip()[-400:]}"
            losses[out] = [json.loads(ln)["loss"] for ln in open(f"{tmp}/{out}/log.jsonl") if '"train"' in ln]
    worst = {k: max(abs(a / b - 1) for a, b in zip(losses[k], losses["one"])) for k in ("ddp", "fsdp")}
    return max(worst.values()) < 1e-3, ("10 steps fp32, 2 ranks vs 1, worst relative loss difference: "
                                        + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def gpu_check(a):
    device = torch.device(a.device)
    env = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    for dtype in (torch.bfloat16, torch.float32):  # which expert GEMM a run in this dtype takes here, and why
        env[f"experts_{str(dtype)[6:]}"] = " ".join(expert_path(device, dtype))
    print("gpu-check  " + "  ".join(f"{k}={v}" for k, v in env.items()))
    checks = {"expert path (fused vs loop)": lambda: check_expert_path(device, a.compile),
              "router in fp32": lambda: check_router_precision(device),
              "ALiBi attention (flex, SDPA)": lambda: check_attention(device),
              "training steps": lambda: check_training(device, a.compile),
              "two ranks vs one": lambda: check_two_ranks(device)}
    results, failed = {}, False
    for name, fn in checks.items():
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # a check that crashes is a failed check; the others still run
            ok, detail = False, f"{type(e).__name__}: {str(e).strip()[:600]}"
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        failed |= ok is False
        results[name] = {"status": status, "detail": detail, "seconds": time.perf_counter() - t}
        print(f"  {status}  {name:30} {detail}  ({results[name]['seconds']:.0f} s)", flush=True)
        getattr(a, "keep", lambda r: None)({"env": env, "checks": results, "failed": failed})
    print("gpu-check: " + ("FAILED" if failed else "all checks passed"))
    return {"env": env, "checks": results, "failed": failed}


def parser():
    p = helptext.Parser(prog="gpucheck.py", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the default), cuda:N, or cpu: what a CPU can")
    p.add_argument("--compile", type=rundir.true_or_false, default=True, help="also check torch.compile (default true)")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    a = p.parse_args(argv)
    interrupts.stop_on_signals()
    try:
        parse_device(a.device)  # no such device: named here, before any work
    except ValueError as e:  # above all: no CUDA device here
        p.exit(2, f"gpucheck.py: error: {e}" + ("; this is the GPU smoke test: --device=cpu runs what a CPU can\n"
                                                 if a.device.startswith("cuda") and "no such" in str(e) else "\n"))
    try:
        if a.json is not None:
            if not a.json.strip() or Path(a.json).is_dir() or not Path(a.json).resolve().parent.is_dir():
                raise ValueError(f"--json={a.json!r}: expected a file in a folder that exists")
            safe_io.check_replaceable(a.json, lambda b: json.loads(b).get("command", "").startswith(RESULT_COMMANDS),
                                     "a gpucheck.py or bench.py result")
        a.keep = keeper(a.json, "dev/gpucheck.py " + " ".join(argv))
        result = gpu_check(a)
        if a.json:
            safe_io.write_text(a.json, json.dumps({"command": "dev/gpucheck.py " + " ".join(argv), **result}, indent=1))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"gpucheck.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        interrupts.exit_interrupted("gpucheck.py", e, "; nothing was written")
    sys.exit(1 if result["failed"] else 0)


if __name__ == "__main__":
    main()
