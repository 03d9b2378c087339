"""sweep.py run's runner: the planned runs as train.py children, up to --jobs of them at once.

On CPU each child gets its share of the cores as its thread count (a run's bits depend on it: train.py
records it in summary.json); with GPUs each child gets devices of its own, through CUDA_VISIBLE_DEVICES,
and under torchrun its own rendezvous (--standalone binds a free port). Runs start in plan order. One
run alone writes to the terminal; runs side by side write to train.log in their own run folders, and
the terminal shows the whole sweep: runs done, running and left, and the time left. A run that fails
does not stop the others; Ctrl-C or SIGTERM reaches every child once, and each stops in its own words
at its last checkpoint. When packing pays: docs/results.md, "Packed sweeps".
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from harness import interrupts
from harness import rundir
from harness import safe_io

LOG = "train.log"  # a child's stdout and stderr, in its run folder, when runs share the machine
GRACE = 60         # seconds a stopped child has to stop in its own words before it is killed
POLL = 0.2         # seconds between looks at the children


def status(run_dir):
    """finished (a whole summary with final BPC), resumable (a run was started there), or new. A run
    killed before its first checkpoint is resumable too: train.py --resume starts it again."""
    if rundir.finished(rundir.read_summary(Path(run_dir) / "summary.json")):
        return "finished"
    return "resumable" if rundir.run_files(run_dir) else "new"


@dataclass
class Job:
    """One planned run to train: where it is in the plan, its command line and its planned FLOPs (the
    progress display's unit of work)."""
    number: str        # "[3/35]": its place in the plan, for the terminal
    name: str
    run_dir: Path
    cmd: list          # train.py's command line (with --resume for a started run)
    C: float
    iters: int


# ----------------------------------------------------------------------------- what each child gets
def cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def slots(device_type, jobs, nproc, gpus=None):
    """The environment of each of the `jobs` children that train at once (one child per slot): GPUs of its
    own on CUDA, its share of the cores on CPU. One job with no --gpus changes nothing: the child sees
    what the sweep sees, as `python train.py` would."""
    if device_type == "cuda":  # the host's cores are shared out too: each rank's loader and Python run there
        if jobs == 1 and gpus is None:
            return [{}]
        return [{**c, **g} for c, g in zip(cpu_slots(jobs, nproc), gpu_slots(jobs, nproc, gpus or visible_gpus()))]
    if gpus is not None:
        raise ValueError(f"--gpus={','.join(gpus)}: the runs train on {device_type}, not on GPUs (train.device)")
    return cpu_slots(jobs, nproc)


def cpu_slots(jobs, nproc, environ=os.environ):
    """The environment of each of `jobs` CPU children: each rank's share of the cores as its OpenMP (and
    so torch) thread count, at least one. OMP_NUM_THREADS set for the sweep is kept as it is, and one
    job on one process keeps torch's default."""
    given = environ.get("OMP_NUM_THREADS", "")
    if jobs == 1 and nproc == 1 and not given:
        return [{}]
    threads = int(given) if given.isdigit() and int(given) > 0 else max(1, cores() // (jobs * nproc))
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}] * jobs


def gpu_slots(jobs, nproc, gpus):
    """The environment of each of `jobs` GPU children: nproc devices of its own each, from `gpus` (the IDs
    CUDA_VISIBLE_DEVICES takes) in order."""
    if jobs * nproc > len(gpus):
        raise ValueError(f"--jobs={jobs} with --nproc={nproc} needs {jobs * nproc} GPUs; there are {len(gpus)} "
                         f"({','.join(gpus)}): give fewer jobs, or the GPUs with --gpus")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[k * nproc:(k + 1) * nproc])} for k in range(jobs)]


def visible_gpus(environ=os.environ):
    """The GPU IDs this process sees: CUDA_VISIBLE_DEVICES's entries, else 0..count − 1."""
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    import torch
    return [str(k) for k in range(torch.cuda.device_count())]


def slot_label(env):
    if "CUDA_VISIBLE_DEVICES" in env:
        return f"GPU {env['CUDA_VISIBLE_DEVICES']}"
    threads = env.get("OMP_NUM_THREADS")
    return f"{threads} thread{'s' if threads != '1' else ''}" if threads else ""


# ----------------------------------------------------------------------------- one child
def start_child(job, env, to_log):
    """A train.py child in a session of its own (Ctrl-C at the terminal reaches the sweep alone, which
    passes it on), that the kernel stops if the sweep dies (Linux); its output to the terminal or
    appended to train.log in its run folder."""
    out = None
    if to_log:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        out = safe_io.open_nofollow(job.run_dir / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(out, f"--- sweep.py started {' '.join(job.cmd[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    try:
        return subprocess.Popen(job.cmd, env={**os.environ, **env}, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT if to_log else None,
                                preexec_fn=interrupts.die_with_parent)
    finally:
        if out is not None:
            os.close(out)


def stop_children(children, signum):
    """Pass the signal to every child once, give them GRACE seconds together to stop, then kill the rest."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signum)
    deadline = time.monotonic() + GRACE
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# ----------------------------------------------------------------------------- the sweep's progress
def steps_done(run_dir):
    """The last step in a run's log.jsonl (read from its tail), 0 when there is none yet."""
    try:
        with safe_io.open_plain(Path(run_dir) / "log.jsonl") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return 0


class Progress:
    """The whole sweep on one line: runs done, running and left, the share of this process's FLOPs done,
    and the time left, from each run's planned FLOPs and the FLOP rate so far. A run's work is C times
    the share of its steps still to go when the sweep started it. Live on a terminal; else a line at
    each start and end of a run."""

    def __init__(self, jobs, live):
        self.work = {j.name: j.C * (1 - min(steps_done(j.run_dir), j.iters) / j.iters) for j in jobs}
        self.jobs, self.total, self.t0 = {j.name: j for j in jobs}, sum(self.work.values()) or 1.0, time.monotonic()
        self.done, self.failed = set(), set()
        self.bar = tqdm(total=1000, bar_format="|{bar:24}| {desc}", disable=not live)

    def share_done(self, running):
        """The share of the sweep's work done: the runs that ended, and each running run's steps since it started."""
        work = sum(self.work[n] for n in self.done | self.failed)
        for n in running:
            j = self.jobs[n]
            work += max(0.0, j.C * min(steps_done(j.run_dir), j.iters) / j.iters - (j.C - self.work[n]))
        return min(1.0, work / self.total)

    def line(self, running):
        share, elapsed = self.share_done(running), time.monotonic() - self.t0
        left = len(self.jobs) - len(self.done) - len(self.failed) - len(running)
        eta = f"about {clock(elapsed * (1 - share) / share)} left" if share > 0.005 else "time left: not yet known"
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return share, (f"sweep: {len(self.done)} done{failed}, {len(running)} running, {left} to start; "
                       f"{100 * share:.0f} % of its FLOPs in {clock(elapsed)}, {eta}")

    def show(self, running, event=None):
        """The live bar, redrawn; with an event (a run started or ended), the event and the line, printed."""
        if self.bar.disable and not event:
            return  # nothing to draw: the logs are not read
        share, text = self.line(running)
        if not self.bar.disable:
            self.bar.n = round(1000 * share)
            self.bar.set_description_str(text.removeprefix("sweep: "), refresh=False)
            self.bar.refresh()
        if event:
            (tqdm.write if not self.bar.disable else print)(event + ("" if not self.bar.disable else f"\n  {text}"))
            sys.stdout.flush()

    def close(self):
        self.bar.close()


def clock(seconds):
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60:02d} s"


# ----------------------------------------------------------------------------- the runner
def run_jobs(jobs, slots):
    """Train every job, len(slots) at once, starting them in order; each slot's environment goes to the
    child that holds it. Returns the jobs that failed, each with its exit code."""
    to_log = len(slots) > 1
    progress = Progress(jobs, live=to_log and sys.stderr.isatty())
    pending, running, failed = list(jobs), {}, []  # running: slot -> (job, child, start time)
    try:
        while pending or running:
            for k in [k for k in range(len(slots)) if k not in running][:len(pending)]:
                job = pending.pop(0)
                running[k] = job, start_child(job, slots[k], to_log), time.monotonic()
                where = f"; its output: {job.run_dir / LOG}" if to_log else ""
                progress.show([j.name for j, _, _ in running.values()],
                              f"{job.number} {job.name}: started ({slot_label(slots[k]) or 'one process'}{where})")
            time.sleep(POLL)
            for k, (job, child, t0) in list(running.items()):
                code = child.poll()
                if code is None:
                    continue
                del running[k]
                (progress.done if code == 0 else progress.failed).add(job.name)
                if code != 0:
                    failed.append((job, code))
                progress.show([j.name for j, _, _ in running.values()], f"{job.number} {job.name}: "
                              + (f"finished in {clock(time.monotonic() - t0)}" if code == 0 else
                                 f"failed (exit {code}) after {clock(time.monotonic() - t0)}"))
            progress.show([j.name for j, _, _ in running.values()])
    except KeyboardInterrupt as e:
        progress.close()
        stop_children([child for _, child, _ in running.values()], interrupts.interrupted(e).signum)
        raise
    finally:
        progress.close()
        for _, child, _ in running.values():  # only after an error of the runner itself: no child outlives it
            if child.poll() is None:
                child.kill()
                child.wait()
    return failed


def failures(failed, to_log):
    """The error for the runs that failed: each named with its exit code and where its output is."""
    where = (lambda job: f"log {job.run_dir / LOG}") if to_log else (lambda job: "its output is above")
    return RuntimeError(f"{len(failed)} run(s) failed: " + "; ".join(f"{job.name} (exit {code}, {where(job)})"
                                                                        for job, code in failed)
                        + ". The other runs went on; repeat the command to resume the failed ones")
