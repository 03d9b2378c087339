"""Speed and memory benchmarks, and the GPU smoke test. Numbers go in docs/results.md with the command
and the hardware.

    python dev/bench.py gpu-check   # run first on a new GPU box: the CUDA paths against their references (gpucheck.py)
    python dev/bench.py expert      # MoE FFN vs a dense SwiGLU of the same active FLOPs (fwd + bwd)
    python dev/bench.py attention   # ALiBi through FlexAttention vs SDPA with a bias vs causal flash (fwd + bwd)
    python dev/bench.py step        # whole training steps: an MoE and a dense model of the same N
    python dev/bench.py profile     # where the time of a training step goes, by kernel
    python dev/bench.py nanogpt     # the dense twin against a nanoGPT-style GPT of its shape, per FLOP, and the MoE
    python dev/bench.py versions ../before .  # whole train.py processes of two checkouts, interleaved
    python dev/bench.py parts       # where the time of a CPU training run goes, by part (attention, router, …, save)

The machines are noisy: every benchmark interleaves the things it compares, round after round, and
reports medians and the median of the per-round ratios. --json=PATH also writes the numbers.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock
from dataclasses import asdict, fields
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's root, for python dev/bench.py
from harness import interrupts  # first: Ctrl-C while torch loads ends in one line, not a traceback
from harness import rundir
if __name__ == "__main__":
    interrupts.quit_while_starting("bench.py")

import torch
import torch.nn.functional as F

import data
import flops
import train

from harness import config
from harness import helptext
from harness import logbook
from harness import parallel
from harness import preflight
from harness import safe_io

from dev import op_times
from dev import profile_parts
from dev import reference_gpt
from dev.gpucheck import RESULT_COMMANDS, gpu_check, keeper  # the smoke test is its own program; bench.py gpu-check runs it too
from model import (GPT, GPTConfig, MoE, SwiGLU, alibi_bias, alibi_score_mod, alibi_slopes, causal_block_mask,
                   flex_attention, flex_attention_compiled, routed_experts)
from kernels.custom_ops import gmm

from harness.parallel import device_name


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def minor_faults():
    """Pages the OS has mapped into this process so far (first touches of fresh memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def interleaved(fns, rounds, device, warmup=2, faults=None):
    """Seconds per call of each fn, one list per fn: timed in turn, round after round, after `warmup`
    untimed rounds (compilation, and the heap growing to its steady size). Page faults per fn are
    added to `faults` when given: they are slow on a VM, so a round that grows the heap is slow
    (docs/results.md, "Memory allocation")."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            sync(device)
            f0, t = minor_faults(), time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
            if faults is not None:
                faults[k] = faults.get(k, 0) + minor_faults() - f0
    return times


def moe_parts(moe, x, dy):
    """Two cut-down MoE steps that locate the MoE's extra time, the routing drawn once from its router:
    `fixed routing` is the MoE without its router; `GEMMs only` starts from rows already dispatched and
    stops before combine (the two grouped GEMMs and the gated SwiGLU between them)."""
    with torch.no_grad():
        _, g_TK, e_TK, _ = moe.route(x)
    e_R, order_R = e_TK.flatten().sort(stable=True)
    offs_E = torch.searchsorted(e_R, torch.arange(moe.E, device=x.device), right=True, out_int32=True)
    tok_R = order_R // moe.K
    xs_RD, dys_RD = x.detach()[tok_R].requires_grad_(), dy[tok_R]
    g_R1 = g_TK.flatten()[order_R].unsqueeze(-1).to(x.dtype)

    def shared_loss():
        return (moe.shared(x) * dy).sum() if moe.shared is not None else 0.0

    def fixed():
        return (routed_experts(x, g_TK, e_TK, moe.w13, moe.w2)[0] * dy).sum() + shared_loss()

    def gemms():
        h1, h3 = gmm(xs_RD, moe.w13, offs_E).chunk(2, dim=-1)
        return (gmm(F.silu(h1) * h3 * g_R1, moe.w2, offs_E) * dys_RD).sum() + shared_loss()
    return fixed, gemms, xs_RD


def bench_expert(a):
    """The MoE FFN (router + routed experts + shared expert, forward + backward) against a dense
    SwiGLU of width Dse + K·De, i.e. the same expert FLOPs; the router's are the MoE's overhead.
    --breakdown also times the parts of moe_parts and says where the MoE's extra time goes."""
    device, dtype = torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    cfg = GPTConfig(**config.check_model(dict(scheme="full", L=1, Dm=a.Dm, H=1, E=a.E, K=a.K, De=a.De, Dse=a.Dse)))
    moe = MoE(cfg).to(device, dtype)
    dense = SwiGLU(a.Dm, a.Dse + a.K * a.De).to(device, dtype)
    for p in list(moe.parameters()) + list(dense.parameters()):
        torch.nn.init.normal_(p, 0.0, 0.02)
    x = torch.randn(a.T, a.Dm, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(a.T, a.Dm, device=device, dtype=dtype)
    fixed, gemms, xs = moe_parts(moe, x, dy)
    maybe_compile = torch.compile if a.compile else (lambda f: f)
    fmoe, fdense, ffixed, fgemms = map(maybe_compile, (moe, dense, fixed, gemms))
    leaves = [x, xs, *moe.parameters(), *dense.parameters()]

    def step(loss):
        def run():
            for p in leaves:  # as a training step does (zero_grad(set_to_none=True))
                p.grad = None
            loss().backward()
        return run

    def moe_loss():
        y, aux = fmoe(x)
        return (y * dy).sum() + aux.balance

    fns = {"dense": step(lambda: (fdense(x) * dy).sum()), "MoE": step(moe_loss)}
    if a.breakdown:
        fns.update({"fixed routing": step(ffixed), "GEMMs only": step(fgemms)})
    faults = {}
    t = interleaved(fns, a.rounds, device, a.warmup, faults)
    flop = 6 * a.T * 3 * a.Dm * (a.Dse + a.K * a.De)  # fwd + bwd matmul FLOPs of the experts
    print(f"expert path  T={a.T} Dm={a.Dm} E={a.E} K={a.K} De={a.De} Dse={a.Dse} {a.dtype} "
          f"{'compiled' if a.compile else 'eager'} {device_name(device)} threads={torch.get_num_threads()} "
          f"malloc={a.malloc} warmup={a.warmup} rounds={a.rounds}")
    out = {"shape": {k: getattr(a, k) for k in ("T", "Dm", "E", "K", "De", "Dse")}, "dtype": a.dtype,
           "compiled": a.compile, "device": device_name(device), "median_ms": {}, "tflop_s": {}}
    for k in fns:
        m = statistics.median(t[k])
        out["median_ms"][k], out["tflop_s"][k] = m * 1e3, flop / m / 1e12
        print(f"  {k:14} median {m * 1e3:8.2f} ms  {flop / m / 1e12:8.3f} TFLOP/s  "
              + (f"page faults {faults[k] / a.rounds:,.0f}/step" if device.type == "cpu" else ""))
    ratios = [d / m for d, m in zip(t["dense"], t["MoE"])]
    out["dense_over_moe"] = statistics.median(ratios)
    print(f"  dense/MoE  median of per-round ratios {statistics.median(ratios):.3f}  "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    if a.breakdown:
        def extra(k1, k0):  # median over rounds of the per-round difference, in ms
            return statistics.median(t1 - t0 for t1, t0 in zip(t[k1], t[k0])) * 1e3
        out["extra_ms"] = {"router": extra("MoE", "fixed routing"), "sort_dispatch_combine":
                           extra("fixed routing", "GEMMs only"), "gemms_over_dense": extra("GEMMs only", "dense")}
        print(f"  the MoE's extra time, medians of per-round differences: router (scores, top-K, balance "
              f"loss) {extra('MoE', 'fixed routing'):.2f} ms; sort, dispatch and combine "
              f"{extra('fixed routing', 'GEMMs only'):.2f} ms; grouped GEMMs + SwiGLU over the dense "
              f"FFN's {extra('GEMMs only', 'dense'):.2f} ms")
    return out


# ----------------------------------------------------------------------------- attention
def bench_attention(a):
    """Causal attention forward + backward at one shape: ALiBi through FlexAttention (score_mod + causal
    block mask, compiled), SDPA with the materialised bias (the CPU path), and for scale FlexAttention
    and SDPA's causal kernel without any bias. FlexAttention has no backward on CPU: there, forward only."""
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    backward = device.type == "cuda"
    torch.manual_seed(0)
    q, k, v = (torch.randn(a.B, a.H, a.S, a.Dh, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    dy = torch.randn_like(q)
    bias = alibi_bias(torch.tensor(alibi_slopes(a.H), device=device), a.S, dtype)
    mask = causal_block_mask(a.S, device)
    flex = flex_attention_compiled() if a.compile else flex_attention  # uncompiled: a slow reference
    alibi = alibi_score_mod(a.H)
    variants = {"flex + ALiBi": lambda: flex(q, k, v, score_mod=alibi, block_mask=mask),
                "SDPA + ALiBi bias": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                "flex causal": lambda: flex(q, k, v, block_mask=mask),
                "SDPA causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}

    def step(f):
        def run():
            y = f()
            if backward:
                q.grad = k.grad = v.grad = None
                y.backward(dy)
        return run
    t = interleaved({name: step(f) for name, f in variants.items()}, a.rounds, device, a.warmup)
    fwd = 4 * a.B * a.H * a.Dh * a.S * (a.S + 1) / 2  # QKᵀ and PV over the causal triangle
    flop = 3 * fwd if backward else fwd
    print(f"attention  B={a.B} H={a.H} S={a.S} Dh={a.Dh} {a.dtype} {'fwd + bwd' if backward else 'forward only'} "
          f"{device_name(device)} flex {'compiled' if a.compile else 'eager'} warmup={a.warmup} rounds={a.rounds}; "
          "TFLOP/s over the causal triangle"
          + (", backward counted as 2× forward" if backward else ""))
    out = {"shape": {k: getattr(a, k) for k in ("B", "H", "S", "Dh")}, "dtype": a.dtype, "backward": backward,
           "device": device_name(device), "median_ms": {}, "tflop_s": {}}
    for name in variants:
        m = statistics.median(t[name])
        out["median_ms"][name], out["tflop_s"][name] = m * 1e3, flop / m / 1e12
        print(f"  {name:18} median {m * 1e3:8.3f} ms  {flop / m / 1e12:8.2f} TFLOP/s")
    for num, den in (("flex + ALiBi", "SDPA causal"), ("flex + ALiBi", "SDPA + ALiBi bias"), ("flex + ALiBi", "flex causal")):
        r = statistics.median(x / y for x, y in zip(t[num], t[den]))
        out[f"{num} / {den}"] = r
        print(f"  {num} / {den}: {r:.3f} (median of per-round ratios)")
    return out


def matmul_rate(device, dtype, n=4096, rounds=5):
    """The FLOP/s of one big square matmul: the roof a CPU has no datasheet for."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = interleaved({"mm": lambda: a @ a}, rounds, device)["mm"]
    return 2 * n**3 / statistics.median(t)


def model_args(shape):
    return [f"--{f.name}={getattr(shape, f.name)}" for f in fields(flops.Shape)]


def load_shape(path, flag="--config"):
    """The [model] shape of a TOML file given with flag, the flag and the file named on any error."""
    try:
        model = safe_io.load_toml(path).get("model")
        if not isinstance(model, dict):
            raise ValueError("no [model] table: expected a config with the model's shape")
        return config.shape_from_dict(model, path)
    except ValueError as e:
        raise ValueError(f"{flag}={path}: {e}") from None


def bench_step(a):
    """Training steps through train.py itself (loader, forward, backward, clipping, AdamW), for an MoE
    and a dense model of the same N, one run after the other, round after round. MFU counts the FLOPs
    executed (flops.M_exec: LM head included, causal attention), not the paper's M_train."""
    moe = load_shape(a.moe, "--moe") if a.moe else flops.Shape()
    N = flops.count(moe).N
    dense = load_shape(a.dense, "--dense") if a.dense else flops.dense_shape(N, L=moe.L, S=moe.S, Dh=moe.Dh)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    common = [f"--iters={a.iters}", f"--batch_seqs={a.batch_seqs}", f"--micro_batch={a.micro_batch}",
              f"--eval_interval={a.iters}", f"--eval_tokens={moe.S + 1}", f"--log_interval={a.log_interval}",
              f"--warmup={a.iters}", f"--compile={a.compile}", f"--device={a.device}", f"--data={a.data}"]
    for shape in (dense, moe):  # train.py's own checks on both runs, before anything is measured
        mvals, tcfg, given, _ = config.load_config(model_args(shape) + common)
        preflight.check_run(mvals, tcfg, given, False, 1, device)
    peak, peak_label = logbook.peak_flops(config.TrainConfig(peak_flops=a.peak_flops), device), "datasheet bf16 peak"
    if a.peak_flops:
        peak_label = "given peak"
    elif not peak:
        peak, peak_label = matmul_rate(device, dtype), "measured 4096² fp32 matmul rate"
    stats = {name: {"tok_s": [], "data": [], "mem": []} for name in ("dense", "moe")}
    out = {"device": device_name(device), "peak_flops": peak, "peak_label": peak_label, "compiled": a.compile,
           "batch_seqs": a.batch_seqs, "micro_batch": a.micro_batch or a.batch_seqs, "iters": a.iters, "models": {}}
    # it times steps: no sample, and no checkpoint (at 350M several GB, written and checksummed)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(train, "save", lambda t, at_step: None):
        for r in range(a.rounds):
            for name, shape in (("dense", dense), ("moe", moe)):
                summary = train.train(model_args(shape) + common + ["--sample_tokens=0", f"--out_dir={tmp}/{name}{r}"])
                logs = [x for x in rundir.read_log(Path(tmp) / f"{name}{r}" / "log.jsonl") if x["kind"] == "train"][1:]  # after warm-up
                stats[name]["tok_s"] += [x["tokens_per_s"] for x in logs]
                stats[name]["data"] += [x["data_share"] for x in logs]
                stats[name]["mem"] += [x["peak_mem_gib"] for x in logs if "peak_mem_gib" in x]
                stats[name]["M_exec"], stats[name]["vocab"] = summary["M_exec"], summary["config"]["model"]["vocab_size"]
                out["models"][name] = step_numbers(shape, stats[name], peak)
                a.keep(out)  # what is measured so far survives a time cap
    out["moe_mfu_over_dense"] = out["models"]["moe"]["mfu"] / out["models"]["dense"]["mfu"]
    print(f"\ntraining step  {device_name(device)} {str(dtype).replace('torch.', '')} {'compiled' if a.compile else 'eager'} "
          f"threads={torch.get_num_threads()} batch={a.batch_seqs}x{moe.S} micro={a.micro_batch or a.batch_seqs} "
          f"iters={a.iters} rounds={a.rounds}; MFU from the FLOPs executed (M_exec) against the {peak_label}, "
          f"{peak / 1e12:.3g} TFLOP/s")
    print(f"  {'model':6}{'N':>13}{'Na':>13}{'r_a':>7}{'M_exec':>10}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'peak GiB':>9}{'loader':>8}")
    for name, shape in (("dense", dense), ("moe", moe)):
        m = out["models"][name]
        mem = m["peak_mem_gib"]
        print(f"  {name:6}{m['N']:>13,}{m['Na']:>13,}{100 * m['ra']:>6.1f}%{m['M_exec']:>10.3g}{m['tokens_per_s']:>10,.0f}"
              f"{m['tokens_per_s'] * m['M_exec'] / 1e12:>9.3g}{100 * m['mfu']:>6.1f}%"
              f"{mem if mem is not None else float('nan'):>9.1f}{100 * m['loader_share']:>7.2f}%")
        shown = {k: v for k, v in asdict(shape).items() if name == "moe" or k not in ("E", "K", "De", "Dse")}
        print("         shape: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + f", vocab_size={m['vocab_size']}")
    print(f"  MoE MFU / dense MFU {out['moe_mfu_over_dense']:.3f}; loader = median share of step time in Loader.next_step")
    return out


def step_numbers(shape, st, peak):
    """One model's line of the step benchmark from its runs' records so far."""
    c, M = flops.count(shape), st["M_exec"]
    tok_s = statistics.median(st["tok_s"])
    return {"shape": asdict(shape), "N": c.N, "Na": c.Na, "ra": c.ra, "M_exec": M, "M_train": flops.M_train(shape),
            "vocab_size": st["vocab"], "tokens_per_s": tok_s, "mfu": tok_s * M / peak,
            "peak_mem_gib": max(st["mem"]) if st["mem"] else None, "loader_share": statistics.median(st["data"])}


# ----------------------------------------------------------------------------- profile
def kernel_kind(name):
    """A coarse kind for a CUDA kernel's name, for the profile summary."""
    n = name.lower()
    for kind, keys in (("attention (flex)", ("flex", "triton_tem")),  # inductor's templates: FlexAttention's
                       ("attention (sdpa)", ("flash", "fmha", "attention")),
                       ("grouped GEMM (experts)", ("grouped", "group_gemm", "groupproblemshape", "ptrarray")),
                       ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "::mm", "bmm", "addmm")),
                       ("optimizer", ("adam",)), ("communication", ("nccl",)),
                       ("sort, top-K, gather, scatter", ("sort", "topk", "gather", "scatter", "index", "radix", "cub")),
                       ("fused elementwise (inductor)", ("triton",))):
        if any(k in n for k in keys):
            return kind
    return "other elementwise / reduction"


def bench_profile(a):
    """A few training steps of one model (train.train_step: bf16 autocast, compiled blocks, fused AdamW, as
    train.py runs them) under torch.profiler after warm-up: GPU time by kernel kind and the top kernels."""
    device = torch.device(a.device)
    shape = load_shape(a.config) if a.config else flops.Shape()
    cfg = GPTConfig(**asdict(shape), vocab_size=a.vocab_size)
    attention = "flex" if device.type == "cuda" else "sdpa"
    model = GPT(cfg, attention).to(device)
    fwd = model.compile_regions() if a.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = parallel.autocast_for(device, "bfloat16" if device.type == "cuda" else "float32")  # as train.py
    step_ctx = train.Step(model=model, fwd=fwd, optimizer=opt, autocast=autocast, device=device)
    idx = torch.randint(0, cfg.vocab_size, (a.batch_seqs, cfg.S + 1)).numpy()
    batches = [(idx[:, :-1], idx[:, 1:])]  # one micro-batch, as the loader hands it to train.py's step

    def step():
        train.train_step(step_ctx, batches)
    for _ in range(a.warmup):
        step()
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            step()
        sync(device)
    if device.type == "cuda":  # the kernels themselves (an op's own events would count them twice)
        times = {e.key: e.self_device_time_total for e in prof.key_averages()
                 if e.device_type == torch.autograd.DeviceType.CUDA}
    else:  # no kernels on a CPU: the ops' own time
        times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(times.values()) or 1
    kinds = {}
    for name, us in times.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0) + us
    c = flops.count(shape)
    print(f"profile  {a.config or 'the CPU toy'}: N={c.N:,} r_a={100 * c.ra:.1f}% batch {a.batch_seqs}x{cfg.S} "
          f"{device_name(device)} {attention}{' compiled' if a.compile else ''}; {a.steps} steps after {a.warmup}, "
          f"{total / a.steps / 1e3:.2f} ms of {'GPU' if device.type == 'cuda' else 'CPU'} time per step")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:32}{100 * us / total:6.1f}%  {us / a.steps / 1e3:8.2f} ms/step")
    print("  top kernels:")
    top = sorted(times.items(), key=lambda kv: -kv[1])[:a.top]
    for name, us in top:
        print(f"  {100 * us / total:6.1f}%  {us / a.steps / 1e3:8.3f} ms  {name[:110]}")
    return {"config": a.config, "device": device_name(device), "ms_per_step": total / a.steps / 1e3,
            "kinds": {k: v / total for k, v in kinds.items()}, "top": [[n, us / total] for n, us in top]}


# ----------------------------------------------------------------------------- nanoGPT-style reference
def bench_nanogpt(a):
    """Training steps (forward, backward, clipping, AdamW) of three models, interleaved round after round on
    the same batches: the nanoGPT-style reference at the dense twin's Shape, the dense twin (ours) and
    the MoE (the CPU toy or --moe), all of the same N, each stepped as its own program steps it (AdamW,
    compilation; ours through train.train_step). Compared per executed FLOP (flops.M_exec)."""
    device = torch.device(a.device)
    if a.by_op and (device.type != "cpu" or a.compile):
        raise ValueError(f"--by_op={a.by_op}: times eager CPU ops; expected --device=cpu and --compile=false (or --by_op=0)")
    moe = load_shape(a.moe, "--moe") if a.moe else flops.Shape()
    twin = flops.dense_shape(flops.count(moe).N, L=moe.L, S=moe.S, Dh=moe.Dh)
    try:
        meta = data.load_meta(a.data)
    except (ValueError, OSError) as e:
        raise ValueError(f"--data={a.data}: {e}") from None
    V = config.padded_vocab(meta["vocab_size"])
    torch.manual_seed(0)
    models = {"nanoGPT-style": reference_gpt.ReferenceGPT(twin, V), "dense twin": GPT(GPTConfig(**asdict(twin), vocab_size=V)),
              "MoE": GPT(GPTConfig(**asdict(moe), vocab_size=V))}
    if models["nanoGPT-style"].matmul_params() != flops.count(twin).Na:
        raise RuntimeError("the reference's matrices differ from the dense twin's: the FLOP comparison would be unfair")
    if a.compile:  # each as its own program compiles it: nanoGPT's train.py the whole model, ours per block
        models = {name: torch.compile(m) if name == "nanoGPT-style" else m.compile_regions() for name, m in models.items()}
    shapes = {"nanoGPT-style": twin, "dense twin": twin, "MoE": moe}
    loader = data.Loader(data.open_split(a.data, "train", meta), moe.S, seed=0)
    batches = [loader.next_step(a.batch_seqs, 1, 0, 1) for _ in range(4)]  # a step's one micro-batch each
    on_device = [tuple(torch.from_numpy(t).to(device) for t in b[0]) for b in batches]  # the reference's

    def stepper(model, name):
        model.to(device).train()
        # each model's AdamW as its program makes it: nanoGPT's configure_optimizers fuses it on CUDA only,
        # train.py everywhere (--same_optimizer: nanoGPT's for all three)
        fused = device.type == "cuda" or (name != "nanoGPT-style" and not a.same_optimizer)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
        turn = [0]
        if name != "nanoGPT-style":  # ours: train.py's step
            step_ctx = train.Step(model=model, fwd=model, optimizer=opt, autocast=parallel.autocast_for(device, "float32"),
                                  device=device)

            def step():
                train.train_step(step_ctx, batches[turn[0] % len(batches)])
                turn[0] += 1
            return step

        def reference_step():  # as nanoGPT's train.py steps
            x, y = on_device[turn[0] % len(on_device)]
            turn[0] += 1
            model(x, y)[1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return reference_step
    steps = {name: stepper(m, name) for name, m in models.items()}
    t = interleaved(steps, a.rounds, device, a.warmup)
    tokens = a.batch_seqs * moe.S
    print(f"nanoGPT-style reference, dense twin and MoE  {device_name(device)} fp32 {'compiled' if a.compile else 'eager'}"
          f"{' same-optimizer' if a.same_optimizer else ''} threads={torch.get_num_threads()} "
          f"batch={a.batch_seqs}x{moe.S} warmup={a.warmup} rounds={a.rounds}; M_exec = FLOPs executed per token")
    print(f"  {'model':15}{'N':>12}{'r_a':>7}{'M_exec':>10}{'ms/step':>10}{'tok/s':>9}{'GFLOP/s':>9}")
    out = {"device": device_name(device), "compiled": a.compile, "same_optimizer": a.same_optimizer,
           "threads": torch.get_num_threads(), "batch_seqs": a.batch_seqs, "rounds": a.rounds, "models": {}}
    for name, shape in shapes.items():
        c, M, ms = flops.count(shape), flops.M_exec(shape, V), 1e3 * statistics.median(t[name])
        out["models"][name] = {"shape": asdict(shape), "N": c.N, "M_exec": M, "ms_per_step": ms,
                               "tokens_per_s": tokens / ms * 1e3, "flop_s": M * tokens / ms * 1e3}
        print(f"  {name:15}{c.N:>12,}{100 * c.ra:>6.1f}%{M:>10.3g}{ms:>10.1f}{tokens / ms * 1e3:>9,.0f}{M * tokens / ms / 1e6:>9.2f}")
    ratio = {  # the two dense models execute the same FLOPs per token: their FLOP/s ratio is that of their speeds
        "dense twin / nanoGPT-style, FLOP/s": statistics.median(r / d for r, d in zip(t["nanoGPT-style"], t["dense twin"])),
        "MoE / dense twin, tokens/s": statistics.median(d / m for d, m in zip(t["dense twin"], t["MoE"]))}
    for k, v in ratio.items():
        print(f"  {k}: {v:.3f} (median of per-round ratios)")
    if a.by_op:
        by_op = op_times.ms_by_op(steps, a.by_op)
        op_times.print_by_op(by_op, top=12)
        out["ms_by_op"] = by_op
    return {**out, "ratios": ratio}


# ----------------------------------------------------------------------------- versions
def checkout_label(folder):
    """The checkout's commit, "+ changes" when its tracked files differ from it; "?" without git."""
    try:
        git = [subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True).stdout.strip()
               for args in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])]
    except OSError:
        return "?"
    return (git[0] or "?") + (" + changes" if git[1] else "")


def bench_versions(a):
    """Whole `python train.py` processes of two or more checkouts (folders of this repository at other
    commits: `git worktree add`), one after the other, round after round, on the same data and arguments.
    Wall time per process, start-up, evaluations, saves and the sample included."""
    dirs = [Path(d).resolve() for d in a.checkouts]
    for d in dirs:
        if not (d / "train.py").is_file():
            raise ValueError(f"{d}: no train.py: expected a checkout of this repository")
    args = ([str(Path(a.config).resolve())] if a.config else []) + [
        f"--iters={a.iters}", f"--batch_seqs={a.batch_seqs}", f"--eval_tokens={a.eval_tokens}", f"--data={Path(a.data).resolve()}"]
    walls = {d: [] for d in dirs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.warmup + a.rounds):
            for i, d in enumerate(dirs):
                t = time.perf_counter()
                done = subprocess.run([sys.executable, "train.py", *args, f"--out_dir={tmp}/{i}-{r}"], cwd=d,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode:
                    raise RuntimeError(f"train.py {' '.join(args)} in {d} failed (exit {done.returncode}): "
                                       f"{done.stderr.strip()[-500:]}")
                if r >= a.warmup:
                    walls[d].append(time.perf_counter() - t)
    last = dirs[-1]
    print(f"train.py, whole processes  threads={os.environ.get('OMP_NUM_THREADS', 'default')} "
          f"args: {' '.join(args)}; {a.rounds} rounds after {a.warmup}")
    out = {"args": args, "rounds": a.rounds, "checkouts": {}}
    for d in dirs:
        ratio = statistics.median(x / y for x, y in zip(walls[d], walls[last]))
        label = checkout_label(d)
        out["checkouts"][str(d)] = {"commit": label, "walls_s": walls[d], "median_s": statistics.median(walls[d]),
                                    f"over {last.name}": ratio}
        print(f"  {str(d):40} {label:22} median {statistics.median(walls[d]):7.2f} s   over {last.name}: {ratio:.3f} "
              f"(median of per-round ratios; rounds {', '.join(f'{w:.1f}' for w in walls[d])})")
    return out


# ----------------------------------------------------------------------------- parts
def bench_parts(a):
    """A short train.py run of the CPU toy (or the config given; --dense_twin: its dense twin at equal N),
    timed and profiled by part (profile_parts.py), projected onto the whole run the same config makes:
    its steps, evaluations, saves and log lines, and the sample."""
    if a.warmup >= a.steps:
        raise ValueError(f"--warmup={a.warmup}: expected fewer steps than --steps={a.steps}, so that some are timed")
    base = load_shape(a.config) if a.config else flops.Shape()
    shape = flops.dense_shape(flops.count(base).N, L=base.L, S=base.S, Dh=base.Dh) if a.dense_twin else base
    m = profile_parts.measure(model_args(shape) + [f"--data={a.data}", f"--device={a.device}"], a.steps, a.warmup)
    walls, iters, step_ms, profiled_ms = m["walls"], m["sched"].iters, m["step_ms"], m["profiled_step_ms"]
    calls = {"evaluation": m["evals"], "checkpoint save": m["saves"], "sample": 1 if "sample" in walls else 0}
    rows = [(p, ms * step_ms / profiled_ms, iters) for p, ms in m["inside_ms"].items()]  # profiled shares, unprofiled step
    rows += [(p, 1e3 * sum(walls[p][a.warmup:]) / (a.steps - a.warmup), iters) for p in ("loader", "logging") if p in walls]
    rows += [(p, 1e3 * statistics.median(walls[p]), calls[p]) for p in profile_parts.PER_CALL if p in walls]
    startup = m["run_s"] - sum(sum(w) for p, w in walls.items() if p in (profile_parts.STEP, "loader", "logging")
                               + profile_parts.PER_CALL)
    rows.append(("start-up (data, model, checks, run directory) and the rest", 1e3 * startup, 1))
    order = {p: i for i, p in enumerate(profile_parts.IN_STEP)}
    rows.sort(key=lambda r: order.get(r[0], len(order)))
    total = sum(ms * k for _, ms, k in rows)
    c = flops.count(shape)
    print(f"parts  {a.config or 'the CPU toy'}{' (its dense twin)' if a.dense_twin else ''}: {shape.scheme}, N={c.N:,}, "
          f"r_a={100 * c.ra:.1f}%, {device_name(torch.device(a.device))}, threads={torch.get_num_threads()}, "
          f"eager; a {a.steps}-step run, its last {a.steps - a.warmup} steps timed and profiled")
    print(f"  a step: {step_ms:.1f} ms ({profiled_ms:.1f} ms under the profiler; its parts below are its shares of the "
          f"profiled step, scaled to the unprofiled one). The whole run of this config ({iters} steps, {m['evals']} "
          f"evaluations, {m['saves']} saves, {m['logs']} log lines), projected: {total / 1e3:.1f} s")
    print(f"  {'part':58}{'ms per call':>12}{'calls':>7}{'s in run':>10}{'share':>8}")
    for part, ms, k in rows:
        print(f"  {part:58}{ms:>12.3f}{k:>7}{ms * k / 1e3:>10.2f}{100 * ms * k / total:>7.1f}%")
    return {"config": a.config, "dense_twin": a.dense_twin, "shape": asdict(shape), "threads": torch.get_num_threads(),
            "steps": a.steps, "step_ms": step_ms, "profiled_step_ms": profiled_ms, "run_s": total / 1e3,
            "parts": {p: {"ms_per_call": ms, "calls": k, "share": ms * k / total} for p, ms, k in rows}}


def at_least(low, high=2**20):
    """An argparse type: an integer in low..high, named in the error."""
    def parse(raw):
        try:
            v = int(raw)
        except ValueError:
            v = low - 1
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high:,}, got {raw!r}")
        return v
    return parse


def bench_bytes(a):
    """About how much memory a benchmark of these sizes takes (fp32, forward and backward), to refuse the
    impossible before allocating: expert and attention from their tensors, step and profile from
    train.py's memory plan."""
    if a.what == "expert":
        width = a.Dse + a.K * a.De
        params = a.E * 3 * a.Dm * a.De + a.Dm * a.E + 3 * a.Dm * a.Dse + 3 * a.Dm * width
        return 4 * (3 * params + a.T * (8 * a.Dm + a.K * (2 * a.Dm + 6 * a.De) + 6 * width + 2 * a.E))
    if a.what == "attention":
        return 4 * (12 * a.B * a.H * a.S * a.Dh + a.H * a.S ** 2 + 3 * a.B * a.H * a.S ** 2)
    if a.what in ("step", "profile"):
        from harness import parallel
        shapes = [load_shape(getattr(a, k), f"--{k}") if getattr(a, k, None) else flops.Shape() for k in ("moe", "config")]
        cfg = GPTConfig(**asdict(shapes[0] if a.what == "step" else shapes[1]), vocab_size=getattr(a, "vocab_size", 256))
        return parallel.memory(cfg, a.batch_seqs, "single", 1, "float32", False, attention="sdpa").total
    return 0


def check_memory(a, device):
    """Refuse a benchmark that cannot fit the device's memory, naming its sizes."""
    from harness import parallel
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else parallel.host_bytes()
    need = bench_bytes(a)
    if capacity and need > capacity:
        sizes = {"expert": "--T, --Dm, --E, --K, --De, --Dse", "attention": "--B, --H, --S, --Dh",
                 "step": "--batch_seqs or the model of --moe", "profile": "--batch_seqs, --vocab_size or the model"}[a.what]
        raise ValueError(f"{a.what} at these sizes needs about {need / 2**30:.4g} GiB, more than the "
                         f"{capacity / 2**30:.1f} GiB of {device_name(device)}: give smaller {sizes}")


def parser():
    """The command line (tests/test_every_input.py fuzzes each of its flags)."""
    p = helptext.Parser(prog="bench.py", allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpu-check", allow_abbrev=False, help="the smoke test to run first on a new GPU box")
    e = sub.add_parser("expert", allow_abbrev=False, help="MoE FFN vs dense SwiGLU of equal active FLOPs")
    e.add_argument("--breakdown", action="store_true", help="also time the MoE without its router, "
                   "and its grouped GEMMs alone, to say where its extra time goes")
    for name, default in [("T", 8192), ("Dm", 512), ("E", 32), ("K", 4), ("De", 256), ("Dse", 0)]:
        e.add_argument(f"--{name}", type=at_least(0 if name == "Dse" else 1, 2**24 if name == "T" else config.RANGES.get(name, (0, 2**20))[1]),
                       default=default)
    at = sub.add_parser("attention", allow_abbrev=False, help="FlexAttention with ALiBi vs SDPA (bias, causal)")
    for name, default in [("B", 8), ("H", 16), ("S", 2048), ("Dh", 128)]:
        at.add_argument(f"--{name}", type=at_least(1, config.RANGES.get(name, (0, 2**20))[1]), default=default)
    t = sub.add_parser("step", allow_abbrev=False, help="training steps of an MoE and a dense model of the same N")
    t.add_argument("--moe", help="TOML with the MoE's [model] (default: the CPU toy)")
    t.add_argument("--dense", help="TOML with the dense [model] (default: solved for the MoE's N, same L)")
    t.add_argument("--iters", type=at_least(2, 10**6), default=60)
    t.add_argument("--micro_batch", type=at_least(0), default=0)
    t.add_argument("--log_interval", type=at_least(1), default=10)
    t.add_argument("--peak_flops", type=float, default=0.0,  # checked by train.py's config
                   help="per-device peak for MFU (default: datasheet on GPU, a measured matmul on CPU)")
    pr = sub.add_parser("profile", allow_abbrev=False, help="GPU time of training steps by kernel kind")
    pr.add_argument("config", nargs="?", help="TOML with the [model] (default: the CPU toy)")
    pr.add_argument("--vocab_size", type=at_least(1, 2**32), default=256)
    pr.add_argument("--steps", type=at_least(1, 10**4), default=3, help="profiled steps")
    pr.add_argument("--top", type=at_least(1, 10**4), default=12, help="kernels listed")
    ng = sub.add_parser("nanogpt", allow_abbrev=False, help="the dense twin against a nanoGPT-style GPT, and the MoE")
    ng.add_argument("--moe", help="TOML with the MoE's [model] (default: the CPU toy)")
    ng.add_argument("--same_optimizer", type=rundir.true_or_false, default=False,
                    help="true: nanoGPT's AdamW (unfused off CUDA) for all three, to compare the models alone")
    ng.add_argument("--by_op", type=at_least(0, 10**4), default=0,
                    help="then N more rounds, each step's ops timed one by one: ms per step by op (eager CPU)")
    ve = sub.add_parser("versions", allow_abbrev=False, help="whole train.py processes of checkouts, interleaved")
    ve.add_argument("checkouts", nargs="+", help="folders of this repository (git worktree add); ratios over the last")
    ve.add_argument("--config", help="a train.py config file (default: none, the CPU toy)")
    ve.add_argument("--iters", type=at_least(1, 10**6), default=120)
    ve.add_argument("--batch_seqs", type=at_least(1), default=10, help="the CPU toy's own batch")
    ve.add_argument("--eval_tokens", type=at_least(0, 2**40), default=65536, help="train.py's own default")
    ve.add_argument("--rounds", type=at_least(1, 10**4), default=4)
    ve.add_argument("--warmup", type=at_least(0, 10**4), default=0, help="untimed rounds first")
    ve.add_argument("--data", default="data/shakespeare-byte")
    ve.add_argument("--json", help="also write the results to this JSON file")
    pa = sub.add_parser("parts", allow_abbrev=False, help="a short train.py run profiled by part of model and loop")
    pa.add_argument("config", nargs="?", help="TOML with the [model] (default: the CPU toy)")
    pa.add_argument("--dense_twin", action="store_true", help="the config's dense twin at equal N instead")
    pa.add_argument("--steps", type=at_least(4, 10**4), default=24, help="steps of the profiled run")
    for q in (t, pr, ng):
        q.add_argument("--batch_seqs", type=at_least(1), default=16 if q is not ng else 10)
    for q in (t, pa, ng):
        q.add_argument("--data", default="data/shakespeare-byte")
    for q in (g, e, at, t, pr, pa, ng):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if q is not pa:  # parts times the eager model, as the CPU default runs it
            q.add_argument("--compile", type=rundir.true_or_false, default=q is not ng,
                           help="nanogpt: false (default) eager, as the CPU default runs; true: the reference "
                           "compiled whole, as nanoGPT's train.py does, ours block by block, as train.py does"
                           if q is ng else None)
        q.add_argument("--threads", type=at_least(0, 1024), default=0, help="CPU threads (0 = torch's default)")
        q.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                       help="tuned: keep freed memory in the process (glibc mallopt) and use 2 MB pages, "
                       "see harness.parallel.tune_malloc")
        q.add_argument("--json", help="also write the results to this JSON file")
    for q in (e, at):
        q.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on cuda, else fp32")
    for q in (e, at, t, pr, pa, ng):
        q.add_argument("--warmup", type=at_least(0, 10**4), default=5 if q in (e, at) else 2,
                       help="untimed rounds (steps) first")
        if q is not pa:
            q.add_argument("--rounds", type=at_least(1, 10**4), default={e: 30, at: 20, t: 9, pr: 1, ng: 20}[q])
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    interrupts.stop_on_signals()
    if a.json is not None and (not a.json.strip() or Path(a.json).is_dir() or not Path(a.json).resolve().parent.is_dir()):
        p.error(f"--json={a.json!r}: expected a file in a folder that exists")
    if a.json is not None:
        try:
            safe_io.check_replaceable(a.json, lambda b: json.loads(b).get("command", "").startswith(RESULT_COMMANDS),
                                     "a bench.py result")
        except ValueError as e:
            p.error(f"--json: {e}")
    if getattr(a, "peak_flops", 0.0) is not None and not 0 <= getattr(a, "peak_flops", 0.0) <= 1e30:
        p.error(f"--peak_flops={a.peak_flops}: expected FLOP/s in 0..1e30 (0: the datasheet's, or a measured matmul)")
    for key in ("moe", "dense", "config", "data"):
        if isinstance(getattr(a, key, None), str) and not getattr(a, key).strip():
            p.error(f"--{key}='': expected a file" if key != "data" else "--data='': expected a folder written by data.py")
    try:
        device = parallel.parse_device(getattr(a, "device", "cpu"))  # versions: the processes choose their own
        if getattr(a, "dtype", None) == "auto":
            a.dtype = "bf16" if device.type == "cuda" else "fp32"
        for key in ("moe", "dense", "config"):
            if getattr(a, key, None):
                load_shape(getattr(a, key), f"--{key}")  # a missing file or a bad shape, named before any work
        check_memory(a, device)
        if getattr(a, "malloc", None) == "tuned":
            parallel.tune_malloc()
        if getattr(a, "threads", 0):
            torch.set_num_threads(a.threads)
        a.keep = keeper(a.json, "dev/bench.py " + " ".join(argv or sys.argv[1:]))
        run = {"gpu-check": gpu_check, "expert": bench_expert, "attention": bench_attention, "step": bench_step,
               "profile": bench_profile, "parts": bench_parts,
               "nanogpt": bench_nanogpt, "versions": bench_versions}[a.what]
        result = run(a)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"bench.py {a.what}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        interrupts.exit_interrupted(f"bench.py {a.what}", e, "; nothing was written")
    if a.json:
        try:
            safe_io.write_text(a.json, json.dumps({"command": "dev/bench.py " + " ".join(argv or sys.argv[1:]), **result}, indent=1))
        except (ValueError, OSError) as e:
            print(f"bench.py {a.what}: error: --json={a.json}: {e}", file=sys.stderr)
            sys.exit(2)
    if a.what == "gpu-check" and result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
