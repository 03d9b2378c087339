"""Activation-rate sweeps at fixed N and C, with dense baselines and data reuse: the command line, and the
runner that trains every planned run through train.py (plan: harness/sweep_plan.py; report: harness/sweep_report.py).

    python sweep.py                                        # the CPU toy sweep: plan, run, report (time: docs/results.md)
    python sweep.py plan configs/sweep-7b.toml [--json] [--allow-unequal]
    python sweep.py run configs/sweep-toy.toml [--out=runs/sweep-toy] [--nproc=8] [--only=3] [--emit=slurm]
    python sweep.py report runs/sweep-toy [--split=val]
"""
import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import MISSING, replace
from pathlib import Path

from harness import config
from harness import helptext
from harness import interrupts
from harness import rundir
from harness import safe_io
from harness import sweep_plan
from harness.sweep_report import report

ROOT = Path(__file__).resolve().parent
DEFAULT_SWEEP = ROOT / "configs" / "sweep-toy.toml"


def status(out_dir):
    """finished (a whole summary with final BPC), resumable (a run was started there), or new. A run
    killed before its first checkpoint is resumable too: train.py --resume starts it again."""
    if rundir.finished(rundir.read_summary(Path(out_dir) / "summary.json")):
        return "finished"
    return "resumable" if rundir.run_files(out_dir) else "new"


def run_child(cmd):
    """A train.py child that ends with this process. It runs in a session of its own, so that Ctrl-C at the
    terminal reaches this process alone, which passes the signal (or SIGTERM) on once and gives the child
    a minute to stop in its own words; if this process dies, the kernel sends the child SIGTERM (Linux)."""
    child = subprocess.Popen(cmd, start_new_session=True,  # in this folder: relative paths mean what they mean here
                             preexec_fn=interrupts.die_with_parent)
    try:
        return child.wait()
    except KeyboardInterrupt as e:
        child.send_signal(interrupts.interrupted(e).signum)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        raise
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def run_sweep(path, out, nproc=1, only=None, allow_unequal=False):
    """Run every planned run that has not finished (resuming the started ones). With reuse_at = ["best"],
    the reuse arms join the plan once the no-reuse arms have all finished: a second pass runs them."""
    if nproc < 1:
        raise ValueError(f"--nproc={nproc}: expected processes per run >= 1")
    out = Path(out)
    if out.is_file():
        raise ValueError(f"--out={out} is a file: expected a folder for the sweep's runs")
    done = set()
    while True:
        sweep, runs, train_over = sweep_plan.planned(path, allow_unequal, nproc, out)
        if only is not None and not 0 <= only < len(runs):
            raise ValueError(f"--only={only} names no run: the plan of {path} has runs 0..{len(runs) - 1}")
        todo = [(i, r) for i, r in enumerate(runs) if r.name not in done and (only is None or i == only)]
        if not todo:
            return runs
        from harness import parallel  # torch: the runs are about to start here
        device = parallel.device_of(sweep_plan.train_args_config(runs[0], sweep, train_over, out))
        setups = sweep_plan.check_runs(runs, sweep, train_over, nproc, out, device, prepare=True)
        sweep_plan.check_existing(runs, setups, out)
        out.mkdir(parents=True, exist_ok=True)
        safe_io.write_text(out / "plan.json", json.dumps(sweep_plan.plan_json(runs), indent=1))
        run_all(todo, len(runs), sweep, train_over, out, nproc)
        done |= {r.name for _, r in todo}


def run_all(todo, total, sweep, train_over, out, nproc):
    launcher = [sys.executable, str(ROOT / "train.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train.py")]
    failed = []
    for i, run in todo:
        run_dir = out / run.name
        state = status(run_dir)
        print(f"[{i + 1}/{total}] {run.name}: {state}", flush=True)
        if state == "finished":
            continue
        cmd = launcher + sweep_plan.train_args(run, sweep, train_over, run_dir) + (["--resume"] if state == "resumable" else [])
        if run_child(cmd) != 0:
            failed.append(run.name)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; repeat the command to resume them")


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


def parser():
    """The command line (tests/test_every_input.py fuzzes each of its flags). --help (of the command, plan and
    run) ends with the sweep file's keys."""
    raw = argparse.RawDescriptionHelpFormatter
    keys = keys_help()
    p = argparse.ArgumentParser(prog="sweep.py", allow_abbrev=False, description="\n\n".join(__doc__.split("\n\n")[:2]),
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
                       description="Run (or resume) every planned run through train.py, then report.", epilog=keys,
                       formatter_class=raw)
    r.add_argument("sweep")
    r.add_argument("--out", help="the sweep's folder (default runs/<sweep file name>)")
    r.add_argument("--nproc", type=int, default=1, help="processes per run under torchrun (GPUs of one node)")
    r.add_argument("--only", type=int, help="run only the run with this index in the plan (0-based)")
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
    if getattr(a, "only", None) is not None and (a.only < 0 or a.emit):
        p.error(f"--only={a.only}: " + ("the script of --emit runs every run, one array task each; give one of them"
                                         if a.emit else "expected the index of a run in the plan (0, 1, …)"))
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
                run_sweep(a.sweep, out, a.nproc, a.only, a.allow_unequal)
        else:
            report(a.dir, a.split)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        interrupts.exit_interrupted("sweep.py", e, "; the runs that finished are kept, and the same command resumes the rest")


if __name__ == "__main__":
    main()
