"""Speed and memory benchmarks. Numbers go in the README with the command and the hardware.

    python bench.py expert      # MoE FFN vs a dense SwiGLU of the same active FLOPs (fwd + bwd)
    python bench.py step        # whole training steps: an MoE and a dense model of the same N

The machines are noisy: every benchmark interleaves the things it compares, round after round, and
reports medians and the median of the per-round ratios.
"""
import argparse
import json
import statistics
import tempfile
import time
import tomllib
from dataclasses import asdict, fields

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
import torch.nn.functional as F

import flops
import train
from model import GPTConfig, MoE, SwiGLU, gmm, routed_experts

from train import tune_malloc


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def minor_faults():
    """Pages the OS has mapped into this process so far (first touches of fresh memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def interleaved(fns, rounds, device, warmup=2, faults=None):
    """Seconds per call of each fn, one list per fn: timed in turn, round after round, after `warmup`
    untimed rounds (compilation, and the heap growing to its steady size). Page faults per fn are
    added to `faults` when given: on a VM each costs ~20 us, so a round that grows the heap is slow."""
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
        g_TK, e_TK = F.softmax(moe.router(x).float(), dim=-1).topk(moe.K, dim=-1)
    e_S, order_S = e_TK.flatten().sort(stable=True)
    offs_E = torch.searchsorted(e_S, torch.arange(moe.E, device=x.device), right=True, out_int32=True)
    tok_S = order_S // moe.K
    xs_SD, dys_SD = x.detach()[tok_S].requires_grad_(), dy[tok_S]
    g_S1 = g_TK.flatten()[order_S].unsqueeze(-1).to(x.dtype)

    def shared_loss():
        return (moe.shared(x) * dy).sum() if moe.shared is not None else 0.0

    def fixed():
        return (routed_experts(x, g_TK, e_TK, moe.w13, moe.w2)[0] * dy).sum() + shared_loss()

    def gemms():
        h1, h3 = gmm(xs_SD, moe.w13, offs_E).chunk(2, dim=-1)
        return (gmm(F.silu(h1) * h3 * g_S1, moe.w2, offs_E) * dys_SD).sum() + shared_loss()
    return fixed, gemms, xs_SD


def bench_expert(a):
    """The MoE FFN (router + routed experts + shared expert, forward + backward) against a dense
    SwiGLU of width Dse + K·De, i.e. the same expert FLOPs; the router's are the MoE's overhead.
    --breakdown also times the parts of moe_parts and says where the MoE's extra time goes."""
    device, dtype = torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    cfg = GPTConfig(scheme="full", L=1, Dm=a.Dm, H=1, E=a.E, K=a.K, De=a.De, Dse=a.Dse)
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
        y, balance, _ = fmoe(x)
        return (y * dy).sum() + balance

    fns = {"dense": step(lambda: (fdense(x) * dy).sum()), "MoE": step(moe_loss)}
    if a.breakdown:
        fns.update({"fixed routing": step(ffixed), "GEMMs only": step(fgemms)})
    faults = {}
    t = interleaved(fns, a.rounds, device, a.warmup, faults)
    flop = 6 * a.T * 3 * a.Dm * (a.Dse + a.K * a.De)  # fwd + bwd matmul FLOPs of the experts
    print(f"expert path  T={a.T} Dm={a.Dm} E={a.E} K={a.K} De={a.De} Dse={a.Dse} {a.dtype} "
          f"{'compiled' if a.compile else 'eager'} {device.type} threads={torch.get_num_threads()} "
          f"malloc={a.malloc} warmup={a.warmup} rounds={a.rounds}")
    for k in fns:
        m = statistics.median(t[k])
        print(f"  {k:14} median {m * 1e3:8.1f} ms  {flop / m / 1e9:7.1f} GFLOP/s  "
              f"page faults {faults[k] / a.rounds:,.0f}/step")
    ratios = [d / m for d, m in zip(t["dense"], t["MoE"])]
    print(f"  dense/MoE  median of per-round ratios {statistics.median(ratios):.3f}  "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    if a.breakdown:
        def extra(k1, k0):  # median over rounds of the per-round difference, in ms
            return statistics.median(t1 - t0 for t1, t0 in zip(t[k1], t[k0])) * 1e3
        print(f"  the MoE's extra time, medians of per-round differences: router (scores, top-K, balance "
              f"loss) {extra('MoE', 'fixed routing'):.1f} ms; sort, dispatch and combine "
              f"{extra('fixed routing', 'GEMMs only'):.1f} ms; grouped GEMMs + SwiGLU over the dense "
              f"FFN's {extra('GEMMs only', 'dense'):.1f} ms")


def matmul_rate(device, dtype, n=4096, rounds=5):
    """The FLOP/s of one big square matmul: the roof a CPU has no datasheet for."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = interleaved({"mm": lambda: a @ a}, rounds, device)["mm"]
    return 2 * n**3 / statistics.median(t)


def model_args(shape):
    return [f"--{f.name}={getattr(shape, f.name)}" for f in fields(flops.Shape)]


def load_shape(path):
    with open(path, "rb") as f:
        return flops.shape_from_dict(tomllib.load(f).get("model", {}), path)


def bench_step(a):
    """Training steps through train.py itself (loader, forward, backward, clipping, AdamW), for an MoE
    and a dense model of the same N, one run after the other, round after round."""
    moe = load_shape(a.moe) if a.moe else flops.Shape()
    N = flops.count(moe).N
    dense = load_shape(a.dense) if a.dense else flops.dense_shape(N, L=moe.L, S=moe.S, Dh=moe.Dh)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak, peak_label = train.peak_flops(train.TrainConfig(peak_flops=a.peak_flops), device), "datasheet bf16 peak"
    if a.peak_flops:
        peak_label = "given peak"
    elif not peak:
        peak, peak_label = matmul_rate(device, dtype), "measured 4096² fp32 matmul rate"
    common = [f"--iters={a.iters}", f"--batch_seqs={a.batch_seqs}", f"--micro_batch={a.micro_batch}",
              f"--eval_interval={a.iters}", f"--eval_tokens={moe.S + 1}", f"--log_interval={a.log_interval}",
              f"--warmup={a.iters}", f"--compile={a.compile}", f"--device={a.device}", f"--data={a.data}"]
    stats = {"dense": {"tok_s": [], "data": []}, "moe": {"tok_s": [], "data": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, shape in (("dense", dense), ("moe", moe)):
                train.train(model_args(shape) + common + [f"--out_dir={tmp}/{name}{r}"])
                logs = [json.loads(x) for x in open(f"{tmp}/{name}{r}/log.jsonl") if '"train"' in x][1:]  # after warm-up
                stats[name]["tok_s"] += [x["tokens_per_s"] for x in logs]
                stats[name]["data"] += [x["data_share"] for x in logs]
    print(f"\ntraining step  {device.type} {str(dtype).replace('torch.', '')} {'compiled' if a.compile else 'eager'} "
          f"threads={torch.get_num_threads()} batch={a.batch_seqs}x{moe.S} iters={a.iters} rounds={a.rounds}; "
          f"MFU against the {peak_label}, {peak / 1e12:.3g} TFLOP/s")
    print(f"  {'model':6}{'N':>12}{'Na':>12}{'r_a':>7}{'M_train':>10}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'loader':>8}")
    mfu = {}
    for name, shape in (("dense", dense), ("moe", moe)):
        c, M = flops.count(shape), flops.M_train(shape)
        tok_s = statistics.median(stats[name]["tok_s"])
        mfu[name] = tok_s * M / peak
        print(f"  {name:6}{c.N:>12,}{c.Na:>12,}{100 * c.ra:>6.1f}%{M:>10.3g}{tok_s:>10,.0f}{tok_s * M / 1e12:>9.3g}"
              f"{100 * mfu[name]:>6.1f}%{100 * statistics.median(stats[name]['data']):>7.2f}%")
        shown = {k: v for k, v in asdict(shape).items() if name == "moe" or k not in ("E", "K", "De", "Dse")}
        print("         shape: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    print(f"  MoE MFU / dense MFU {mfu['moe'] / mfu['dense']:.3f}; loader = median share of step time in Loader.next_step")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("expert", allow_abbrev=False, help="MoE FFN vs dense SwiGLU of equal active FLOPs")
    e.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    e.add_argument("--breakdown", action="store_true", help="also time the MoE without its router, "
                   "and its grouped GEMMs alone, to say where its extra time goes")
    for name, default in [("T", 8192), ("Dm", 512), ("E", 32), ("K", 4), ("De", 256), ("Dse", 0)]:
        e.add_argument(f"--{name}", type=int, default=default)
    t = sub.add_parser("step", allow_abbrev=False, help="training steps of an MoE and a dense model of the same N")
    t.add_argument("--moe", help="TOML with the MoE's [model] (default: the CPU toy)")
    t.add_argument("--dense", help="TOML with the dense [model] (default: solved for the MoE's N, same L)")
    t.add_argument("--iters", type=int, default=60)
    t.add_argument("--batch_seqs", type=int, default=16)
    t.add_argument("--micro_batch", type=int, default=0)
    t.add_argument("--log_interval", type=int, default=10)
    t.add_argument("--data", default="data/shakespeare-byte")
    t.add_argument("--peak_flops", type=float, default=0.0,
                   help="per-device peak for MFU (default: datasheet on GPU, a measured matmul on CPU)")
    for q in (e, t):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
        q.add_argument("--compile", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
        q.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
        q.add_argument("--rounds", type=int, default=30 if q is e else 9)
        q.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                       help="tuned: keep freed memory in the process (glibc mallopt) and use 2 MB pages, "
                       "see train.tune_malloc")
    a = p.parse_args(argv)
    if a.malloc == "tuned":
        tune_malloc()
    if a.threads:
        torch.set_num_threads(a.threads)
    {"expert": bench_expert, "step": bench_step}[a.what](a)


if __name__ == "__main__":
    main()
