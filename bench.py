"""Speed and memory benchmarks. Numbers go in the README with the command and the hardware.

    python bench.py expert      # MoE FFN vs a dense SwiGLU of the same active FLOPs (fwd + bwd)

The machines are noisy: every benchmark interleaves the things it compares, round after round, and
reports medians and the median of the per-round ratios.
"""
import argparse
import statistics
import time

import torch

from model import GPTConfig, MoE, SwiGLU


def tune_malloc():
    """Keep freed memory in the process. glibc's defaults hand big buffers back to the OS after every
    step and fault them in again on the next: 20-40 % slower steps on the CPU machines (measured:
    bench.py expert --malloc=default vs tuned). Same effect as GLIBC_TUNABLES' mmap/trim thresholds."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns, rounds, device, warmup=2):
    """Median seconds per call of each fn, timed in turn, round after round; and the per-round times."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def bench_expert(a):
    """The MoE FFN (router + routed experts + shared expert, forward + backward) against a dense
    SwiGLU of width Dse + K·De, i.e. the same expert FLOPs; the router's are the MoE's overhead."""
    device, dtype = torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    cfg = GPTConfig(scheme="full", L=1, Dm=a.Dm, H=1, E=a.E, K=a.K, De=a.De, Dse=a.Dse)
    moe = MoE(cfg).to(device, dtype)
    dense = SwiGLU(a.Dm, a.Dse + a.K * a.De).to(device, dtype)
    for p in list(moe.parameters()) + list(dense.parameters()):
        torch.nn.init.normal_(p, 0.0, 0.02)
    x = torch.randn(a.T, a.Dm, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(a.T, a.Dm, device=device, dtype=dtype)
    fmoe = torch.compile(moe) if a.compile else moe
    fdense = torch.compile(dense) if a.compile else dense

    def step_moe():
        y, balance, _ = fmoe(x)
        ((y * dy).sum() + balance).backward()

    def step_dense():
        (fdense(x) * dy).sum().backward()

    t = interleaved({"dense": step_dense, "moe": step_moe}, a.rounds, device)
    flop = 6 * a.T * 3 * a.Dm * (a.Dse + a.K * a.De)  # fwd + bwd matmul FLOPs of the experts
    ratios = [d / m for d, m in zip(t["dense"], t["moe"])]
    print(f"expert path  T={a.T} Dm={a.Dm} E={a.E} K={a.K} De={a.De} Dse={a.Dse} {a.dtype} "
          f"{'compiled' if a.compile else 'eager'} {device.type} threads={torch.get_num_threads()} "
          f"malloc={a.malloc} rounds={a.rounds}")
    for k in ("dense", "moe"):
        m = statistics.median(t[k])
        print(f"  {k:6} median {m * 1e3:8.1f} ms  {flop / m / 1e9:8.1f} GFLOP/s")
    print(f"  dense/MoE  median of per-round ratios {statistics.median(ratios):.3f}  "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("expert", allow_abbrev=False, help="MoE FFN vs dense SwiGLU of equal active FLOPs")
    for name, default in [("T", 8192), ("Dm", 512), ("E", 32), ("K", 4), ("De", 256), ("Dse", 0)]:
        e.add_argument(f"--{name}", type=int, default=default)
    for q in (e,):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
        q.add_argument("--compile", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
        q.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
        q.add_argument("--rounds", type=int, default=9)
        q.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                       help="tuned: keep freed memory in the process (glibc mallopt), see train.tune_malloc")
    a = p.parse_args(argv)
    if a.malloc == "tuned":
        tune_malloc()
    if a.threads:
        torch.set_num_threads(a.threads)
    {"expert": bench_expert}[a.what](a)


if __name__ == "__main__":
    main()
