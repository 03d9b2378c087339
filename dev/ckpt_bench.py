"""Save and resume of a whole checkpoint (ckpt.pt, the DDP form) on gloo ranks: time and peak host memory per
rank, for the checkpoint code as it is ("new") and for the path it replaced ("old", reproduced here).

    python dev/ckpt_bench.py --gib=2 --ranks=2 --dir=/tmp/ckpt-bench

Each rank builds the same model (fp32 parameters of 1/48 GiB each, so that weights and AdamW state make a file
of --gib GiB) with its AdamW state. Save: every rank takes the full state dict, rank 0 writes ckpt.pt, a barrier
ends it. Resume: a fresh AdamW on every rank, the checkpoint read, verified and restored into the model and
optimizer, a barrier ends it. Between the two the file is dropped from the page cache (posix_fadvise), so the
resume reads it from the disk, as a resume after a restart does (--warm keeps it cached).

old: the checksum is a sha256 over the state's contents (rundir.checksum, still the earlier format's check), computed before torch.save (a pass over every tensor,
     copying each); on resume every rank loads the whole file into its own memory and hashes the contents.
new: checkpoint.save / read / restore: the file's sha256 is hashed while torch.save writes it; on resume rank 0
     hashes the file once, and every rank maps it (torch.load mmap=True) and copies from it.

Peak memory per rank, for each phase: VmHWM (peak resident set, the file's mapped pages included: those are the
page cache, one copy per machine however many ranks map them; reset before each phase through
/proc/self/clear_refs) and the peak of RssAnon (memory of the process's own, sampled every 10 ms). "held" is
the RSS of the model and its AdamW state before the phase. The files are removed at the end.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from harness import checkpoint, rundir, safe_io  # noqa: E402

GIB = 1 << 30


# ----------------------------------------------------------------------------- memory
def status_kib(field):
    """A field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Peak:
    """The peak of VmHWM and of sampled RssAnon from the start of a phase (with) to its end, in GiB."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.anon, self.running = status_kib("RssAnon"), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.anon = max(self.anon, status_kib("RssAnon"))
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.anon = max(self.anon, status_kib("RssAnon")) / (1 << 20)
        self.hwm = status_kib("VmHWM") / (1 << 20)


# ----------------------------------------------------------------------------- the model
def build(gib):
    """(model, AdamW with its state): gib/12 GiB of fp32 weights in pieces of 1/48 GiB, so that weights, exp_avg
    and exp_avg_sq come to gib GiB (in quarters of a GiB)."""
    torch.manual_seed(0)
    pieces = [torch.nn.Parameter(torch.empty(GIB // 48).uniform_()) for _ in range(max(1, round(gib * 4)))]
    model = torch.nn.ParameterList(pieces)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, optimizer


def extra(world):
    """The fields a checkpoint of train.py carries besides weights and AdamW state."""
    return {"step": 1, "world": world, "schedule": {}, "config": {"model": {}, "train": {}}, "data": {},
            "loader": {}, "rng": {"cpu": torch.get_rng_state()}, "scaler": {}, "threads": [1]}


class Loader:
    def load_state_dict(self, state):
        pass


# ----------------------------------------------------------------------------- the old path, reproduced
def old_save(out, model, optimizer, rank, world):
    weights, adam = checkpoint.model_and_optimizer(model, optimizer, full=True)
    if rank == 0:
        state = {"model": weights, "optimizer": adam, **extra(world)}
        state["sha256"] = rundir.checksum(state).hexdigest()
        safe_io.atomic_write(out / "ckpt.pt", lambda f: torch.save(state, f))


def old_read(out):
    with safe_io.open_plain(out / "ckpt.pt") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if rundir.checksum({k: v for k, v in state.items() if k != "sha256"}).hexdigest() != state.pop("sha256"):
        raise safe_io.RunDirError("damaged")
    return "pt", out / "ckpt.pt", state


# ----------------------------------------------------------------------------- one rank
def new_save(out, model, optimizer, rank, world):
    checkpoint.save(out, False, model, optimizer, extra(world), rank, world)


def rank_main(rank, world, args, mode):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.dir / f'store-{mode}'}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    out = args.dir / "run"
    model, optimizer = build(args.gib)
    before = sum(float(p.detach().sum()) for p in model.parameters())
    held_save = status_kib("VmRSS") / (1 << 20)
    dist.barrier()
    with Peak() as save_peak:
        start = time.perf_counter()
        (old_save if mode == "old" else new_save)(out, model, optimizer, rank, world)
        dist.barrier()
        save_s = time.perf_counter() - start
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)  # as a new process has it
    for p in model.parameters():
        p.data.zero_()
    if rank == 0 and not args.warm:
        with safe_io.open_plain(out / "ckpt.pt") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    held_resume = status_kib("VmRSS") / (1 << 20)
    dist.barrier()
    with Peak() as resume_peak:
        start = time.perf_counter()
        form, path, state = old_read(out) if mode == "old" else checkpoint.read(out, rank, world)
        if mode == "old":  # the old restore kept the loaded AdamW tensors as they came
            checkpoint.own_memory = lambda optimizer: None
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        checkpoint.restore(form, path, state, model, optimizer, scaler, Loader(), torch.device("cpu"))
        del state
        dist.barrier()
        resume_s = time.perf_counter() - start
    after = sum(float(p.detach().sum()) for p in model.parameters())
    assert after == before and len(optimizer.state) == len(list(model.parameters())), (before, after)
    (args.dir / f"{mode}-{rank}.json").write_text(json.dumps({
        "save_s": save_s, "resume_s": resume_s, "held_save": held_save, "held_resume": held_resume,
        "save_hwm": save_peak.hwm, "save_anon": save_peak.anon, "resume_hwm": resume_peak.hwm,
        "resume_anon": resume_peak.anon, "file_gib": (out / "ckpt.pt").stat().st_size / GIB}))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the report
def machine():
    mem = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return (f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {mem['MemTotal'] / (1 << 20):.1f} GiB "
            f"memory, {mem['MemAvailable'] / (1 << 20):.1f} GiB available, torch {torch.__version__}, load average "
            f"{os.getloadavg()[0]:.2f}")


def table(rows, ranks):
    head = ("| path | file GiB | save s | resume s | " + " | ".join(
        f"rank {r} {what}" for what in ("held GiB", "save VmHWM", "save peak anon", "resume VmHWM",
                                         "resume peak anon") for r in range(ranks)) + " |")
    lines = [head, "|" + "---|" * (4 + 5 * ranks)]
    for mode, per_rank in rows.items():
        cells = [mode, f"{per_rank[0]['file_gib']:.2f}", f"{max(r['save_s'] for r in per_rank):.1f}",
                 f"{max(r['resume_s'] for r in per_rank):.1f}"]
        for key in ("held_resume", "save_hwm", "save_anon", "resume_hwm", "resume_anon"):
            cells += [f"{r[key]:.2f}" for r in per_rank]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="the checkpoint's size in GiB (default 2)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="a new folder for the files (default: one in /tmp)")
    parser.add_argument("--modes", default="old,new")
    parser.add_argument("--warm", action="store_true", help="resume with the file still in the page cache")
    args = parser.parse_args()
    if args.dir is None:
        args.dir = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    else:
        args.dir.mkdir(parents=True)  # a new folder: the one removed at the end
    print(machine(), flush=True)
    rows = {}
    try:
        (args.dir / "run").mkdir()
        for mode in args.modes.split(","):
            torch.multiprocessing.spawn(rank_main, args=(args.ranks, args, mode), nprocs=args.ranks)
            rows[mode] = [json.loads((args.dir / f"{mode}-{r}.json").read_text()) for r in range(args.ranks)]
            print(f"{mode}: {rows[mode]}", flush=True)
    finally:
        shutil.rmtree(args.dir)
    print(table(rows, args.ranks))


if __name__ == "__main__":
    main()
