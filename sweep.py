"""Activation-rate sweeps at fixed N and C, with dense baselines and data reuse: the command line, and the
loop that trains every planned run through train.py (plan: harness/sweep_plan.py; runs at once:
harness/sweep_jobs.py; report: harness/sweep_report.py).

    python sweep.py                                        # the CPU toy sweep: plan, run, report (time: docs/results.md)
    python sweep.py plan configs/sweep-7b.toml [--json] [--allow-unequal]
    python sweep.py run configs/sweep-toy.toml [--out=runs/sweep-toy] [--jobs=2] [--nproc=8] [--gpus=0,1] [--only=3,5]
    python sweep.py run configs/sweep-toy.toml --emit=slurm  # one array task per run, beyond one node
    python sweep.py report runs/sweep-toy [--split=val]
"""
import argparse
import json
import shlex
import sys
from dataclasses import MISSING, replace
from pathlib import Path

from harness import config
from harness import helptext
from harness import interrupts
from harness import rundir
from harness import safe_io
from harness import sweep_jobs
from harness import sweep_plan
from harness.sweep_report import report

ROOT = Path(__file__).resolve().parent
DEFAULT_SWEEP = ROOT / "configs" / "sweep-toy.toml"
MAX_JOBS = 4096  # runs at once


def run_sweep(path, out, nproc=1, only=None, allow_unequal=False, jobs=1, gpus=None):
    """Run every planned run that has not finished (resuming the started ones), `jobs` at a time, with the
    sweep's folder locked: alone, or with `--only` beside other `--only` processes, each run folder under
    its train.py's own lock. With reuse_at = ["best"], the reuse arms join the plan once the no-reuse arms
    have all finished: a second pass runs them."""
    if nproc < 1 or jobs < 1:
        raise ValueError(f"--nproc={nproc}, --jobs={jobs}: expected processes per run and runs at once >= 1")
    out = Path(out)
    if out.is_file():
        raise ValueError(f"--out={out} is a file: expected a folder for the sweep's runs")
    done, lock = set(), rundir.Lock(out, "--out", shared=only is not None)  # --only: one of many (a Slurm array)
    try:
        while True:
            sweep, runs, train_over = sweep_plan.planned(path, allow_unequal, nproc, out)
            if only is not None and not set(only) <= set(range(len(runs))):
                raise ValueError(f"--only={','.join(map(str, only))} names no run: the plan of {path} has runs "
                                 f"0..{len(runs) - 1}")
            todo = [(i, r) for i, r in enumerate(runs) if r.name not in done and (only is None or i in only)]
            if not todo:
                return runs
            from harness import parallel  # torch: the runs are about to start here
            device = parallel.device_of(sweep_plan.train_args_config(runs[0], sweep, train_over, out))
            slots = sweep_jobs.slots(device.type, jobs, nproc, gpus)
            setups = sweep_plan.check_runs(runs, sweep, train_over, nproc, out, device, prepare=True)
            if lock.fd is None:
                out.mkdir(parents=True, exist_ok=True)
                lock.acquire()  # one sweep process per folder (or --only ones), from here to its end
                check_kind(out)
            sweep_plan.check_existing(runs, setups, out)
            safe_io.write_text(out / "plan.json", json.dumps(sweep_plan.plan_json(runs), indent=1))
            run_all(todo, len(runs), sweep, train_over, out, nproc, slots)
            done |= {r.name for _, r in todo}
    finally:
        lock.release()


def check_kind(out):
    """A sweep writes only into a folder of its own kind (checked with its lock held): never into a run's
    folder, nor into prepared data."""
    found = rundir.run_files(out)
    kind = f"a run ({', '.join(found)})" if found else "prepared data (data.py)" if (out / "meta.json").exists() else None
    if kind:
        raise ValueError(f"--out={out} holds {kind}: a sweep's folder holds one folder per run; give another --out")


def run_all(todo, total, sweep, train_over, out, nproc, slots):
    """Train the runs of todo that have not finished through train.py (torchrun for nproc > 1), one per
    slot at a time (harness/sweep_jobs.py); every failed run is named at the end."""
    launcher = [sys.executable, str(ROOT / "train.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train.py")]
    jobs = []
    for i, run in todo:
        run_dir = out / run.name
        state = sweep_jobs.status(run_dir)
        if state == "finished":
            print(f"[{i + 1}/{total}] {run.name}: finished", flush=True)
            continue
        cmd = launcher + sweep_plan.train_args(run, sweep, train_over, run_dir) + (["--resume"] if state == "resumable" else [])
        jobs.append(sweep_jobs.Job(f"[{i + 1}/{total}]", run.name, run_dir, cmd, run.C, run.iters))
    if len(slots) > 1 and jobs:
        print(f"{len(jobs)} run(s) to train, {len(slots)} at a time "
              f"({', '.join(dict.fromkeys(sweep_jobs.slot_label(s) for s in slots))})", flush=True)
    failed = sweep_jobs.run_jobs(jobs, slots)
    if failed:
        raise sweep_jobs.failures(failed, len(slots) > 1)


def emit_slurm(path, out, nproc, runs):
    """An sbatch array script: one task per planned run, each resuming where it stopped."""
    if nproc < 1:
        raise ValueError(f"--nproc={nproc}: expected processes per run >= 1")
    script = Path(out) / "sweep.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    q = shlex.quote
    safe_io.write_text(script, f"""#!/bin/bash
#SBATCH --job-name={q("sweep-" + Path(path).stem)}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --nodes=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --output={q(str(Path(out).resolve() / "slurm-%A_%a.log"))}
# {len(runs)} runs planned from {path}; resubmitting resumes unfinished runs and skips finished ones.
cd {q(str(Path.cwd()))}
{q(sys.executable)} {q(str(ROOT / "sweep.py"))} run {q(str(Path(path).resolve()))} --out={q(str(Path(out).resolve()))} \\
    --nproc={nproc} --only=$SLURM_ARRAY_TASK_ID
""")
    print(f"wrote {script}: sbatch {script}")
    if sweep_plan.load_sweep(path)[0].reuse_at == ["best"]:
        print("reuse_at = best: its strict and loose arms join the plan once the no-reuse arms have finished; "
              "emit the script again then")
    return script


# ----------------------------------------------------------------------------- command line
def keys_help():
    """The sweep file's tables and keys, each with its default and meaning (helptext: the field comments)."""
    here = helptext.source_of("sweep_plan")
    shape = {k.name: k for k in helptext.keys(helptext.source_of("flops"), "Shape")}
    arm = {k.name: k for k in helptext.keys(here, "Arm")}
    backbone = [shape[k] for k in sweep_plan.BACKBONE]
    mults = [arm["lr_mult"], arm["batch_mult"]]
    train_keys = [k for k in helptext.keys(*helptext.TRAIN_TABLES["train"]) if k.name not in sweep_plan.SWEEP_OWNED + ("overwrite",)]
    return "\n\n".join([
        "The sweep file's tables and keys (configs/sweep-*.toml):",
        helptext.table("[sweep]", helptext.keys(here, "Sweep")),
        helptext.table("[moe]  the MoE backbone; each arm's E, K, De and Dse come from the sweep",
                       backbone + [replace(arm["mu"], default=MISSING)] + mults),
        helptext.table("[dense]  the dense baseline of the same N (scheme is dense)", backbone[1:] + mults),
        helptext.table(f"[train]  any of train.py's [train] keys but {', '.join(sweep_plan.SWEEP_OWNED)} and overwrite, which the "
                       f"sweep sets for every run", train_keys)]) + "\n"


def indices(text):
    """A comma-separated list of distinct non-negative integers (--only, --gpus)."""
    parts = text.split(",")
    if not all(x.strip().isdigit() for x in parts) or len(set(map(int, parts))) < len(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct indices 0, 1, … separated by commas (3 or 0,2,5)")
    return [int(x) for x in parts]


def parser():
    """The command line (tests/test_every_input.py fuzzes each of its flags). --help (of the command, plan and
    run) ends with the sweep file's keys."""
    raw = argparse.RawDescriptionHelpFormatter
    keys = keys_help()
    p = helptext.Parser(prog="sweep.py", allow_abbrev=False, description="\n\n".join(__doc__.split("\n\n")[:2]),
                        epilog=keys, formatter_class=raw)
    sub = p.add_subparsers(dest="cmd")
    q = sub.add_parser("plan", allow_abbrev=False, help="print the runs of a sweep", description="Print the runs of a "
                       "sweep: shapes, N, C, D, batch and lr, and whether resources are equal (docs/method.md §8).",
                       epilog=keys, formatter_class=raw)
    q.add_argument("sweep")
    q.add_argument("--json", action="store_true")
    q.add_argument("--allow-unequal", action="store_true", help="plan even when N, C or D are not equal")
    q.add_argument("--nproc", type=int, default=1, help="ranks per run (the batch is planned for them)")
    q.add_argument("--gpu_mem", type=float, help="GiB per GPU: add each run's memory per rank, warn where it cannot fit")
    r = sub.add_parser("run", allow_abbrev=False, help="run (or resume) every planned run through train.py",
                       description="Run (or resume) every planned run through train.py, --jobs at once; "
                       "`sweep.py report` then tabulates them.", epilog=keys,
                       formatter_class=raw)
    r.add_argument("sweep")
    r.add_argument("--out", help="the sweep's folder (default runs/<sweep file name>)")
    r.add_argument("--nproc", type=int, default=1, help="processes per run under torchrun (GPUs of one node)")
    r.add_argument("--only", type=indices, help="run only the runs with these indices in the plan (0-based: 3 or 0,2,5)")
    r.add_argument("--jobs", type=int, default=1, help="runs at once: on CPU each gets its share of the cores as its "
                   "threads, with GPUs --nproc GPUs of its own (docs/results.md: when it pays)")
    r.add_argument("--gpus", type=indices, help="the GPU IDs the jobs share out (default: every visible one)")
    r.add_argument("--emit", choices=("slurm",), help="write an sbatch array script instead of running")
    r.add_argument("--allow-unequal", action="store_true")
    t = sub.add_parser("report", allow_abbrev=False, help="tables and a plot of a sweep's final BPCs",
                       description="Tables and a plot of a sweep's final BPCs, from the runs in its folder.")
    t.add_argument("dir")
    t.add_argument("--split", help="the validation split to plot (default val)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    a = p.parse_args(argv)
    interrupts.stop_on_signals()
    lo, hi, allowed = config.RANGES["nproc"]  # the ranges of train.py's
    if getattr(a, "nproc", 1) is not None and not lo <= getattr(a, "nproc", 1) <= hi:
        p.error(f"--nproc={a.nproc}: expected {allowed}")
    hi = config.RANGES["gpu_mem"][1]
    if getattr(a, "gpu_mem", None) is not None and not config.GPU_RESERVE < a.gpu_mem <= hi:
        p.error(f"--gpu_mem={a.gpu_mem}: expected GiB per GPU in ({config.GPU_RESERVE}, 2^20]: {config.GPU_RESERVE} GiB are "
                f"kept for CUDA and NCCL")
    if getattr(a, "emit", None):
        for flag, given in (("only", a.only is not None), ("jobs", a.jobs != 1), ("gpus", a.gpus is not None)):
            if given:
                value = getattr(a, flag)
                p.error(f"--{flag}={','.join(map(str, value)) if isinstance(value, list) else value}: the script of --emit runs every run as an array "
                        f"task of its own, on the GPUs Slurm gives it; leave --{flag} out")
    if getattr(a, "jobs", 1) is not None and not 1 <= getattr(a, "jobs", 1) <= MAX_JOBS:
        p.error(f"--jobs={a.jobs}: expected runs at once in 1..{MAX_JOBS}")
    for name in ("sweep", "dir", "out", "split"):
        if getattr(a, name, None) is not None and not getattr(a, name).strip():
            p.error(f"{'--' if name in ('out', 'split') else ''}{name}='': expected "
                    + {"sweep": "a sweep file", "dir": "a sweep's folder", "out": "a folder", "split": "a split name"}[name])
    try:
        if a.cmd is None:  # the CPU toy, end to end
            out = ROOT / "runs" / DEFAULT_SWEEP.stem
            sweep, runs, _ = sweep_plan.planned(DEFAULT_SWEEP)
            print(sweep_plan.format_plan(runs), flush=True)
            run_sweep(DEFAULT_SWEEP, out)
            report(out)
        elif a.cmd == "plan":
            _, runs, train_over = sweep_plan.planned(a.sweep, a.allow_unequal, a.nproc)
            print(json.dumps(sweep_plan.plan_json(runs), indent=1) if a.json else sweep_plan.format_plan(runs))
            if a.gpu_mem:
                table, warnings = sweep_plan.memory_plan(runs, train_over, a.nproc, a.gpu_mem)
                print(table)
                for w in warnings:
                    rundir.warn(w)
        elif a.cmd == "run":
            out = a.out or ROOT / "runs" / Path(a.sweep).stem
            if a.emit:
                emit_slurm(a.sweep, out, a.nproc, sweep_plan.planned(a.sweep, a.allow_unequal, a.nproc)[1])
            else:
                run_sweep(a.sweep, out, a.nproc, a.only, a.allow_unequal, a.jobs,
                          None if a.gpus is None else [str(g) for g in a.gpus])
        else:
            report(a.dir, a.split)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        interrupts.exit_interrupted("sweep.py", e, "; the runs that finished are kept, and the same command resumes the rest")


if __name__ == "__main__":
    main()
