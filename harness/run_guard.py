"""train.py's hold on its run directory, in one call (protect): every rank refuses a folder it must not
touch before any work is done; then rank 0 alone takes the lock, removes what killed writers left
(temporaries, a half-done --overwrite), checks the run files, and with --overwrite moves the old run aside
(rundir.Aside) until the new run has written its config. rundir.py holds the parts; this module puts them
in their order and adds what needs the other modules: which files --overwrite may replace.
"""
import contextlib
from pathlib import Path

import torch.distributed as dist

from harness import checkpoint
from harness import rundir
from harness import safe_io
from harness import trackers
from harness.config import is_run_config, read_toml


@contextlib.contextmanager
def protect(out_dir, resume, overwrite, config_file=None, rank=0, world=1):
    """The run directory held for the run inside the with block, which gets the old run's rundir.Aside
    (rank 0; None on the other ranks: the new run discards it once its config is written). On leaving it,
    however it is left, the old run is put back if it was not discarded, and the lock is released.
    config_file: the config file this command was given, which --overwrite must not replace."""
    if resume and not rundir.run_files(out_dir) and not (Path(out_dir) / rundir.ASIDE).exists():
        raise FileNotFoundError(f"--resume: no run in {out_dir} (no config.toml, no checkpoint)")
    if not resume:  # every rank refuses before any work; rank 0 checks again, locked
        rundir.check_new_run(out_dir, overwrite)
    if world > 1:
        dist.barrier()  # every rank has checked before rank 0 writes a file
    lock, aside = hold(out_dir, resume, overwrite, config_file) if rank == 0 else (None, None)
    try:
        yield aside
    finally:
        if aside:
            aside.undo()  # the new run failed before its config was written: the old run is put back
        if lock:
            lock.release()


def hold(out_dir, resume, overwrite, config_file=None):
    """Rank 0's hold on out_dir, (lock, aside): the lock, what a killed --overwrite left finished, the run
    files checked (no link, no stranger), and with overwrite the old run moved aside (rundir.Aside)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = rundir.Lock(out).acquire()
    aside = rundir.Aside(out)
    try:
        rundir.remove_temporaries(out)
        aside.recover()
        if resume:
            rundir.check_run_files(out)
        else:
            aside.move(replaceable_run_files(out, overwrite, config_file))
    except BaseException:
        aside.undo()
        lock.release()
        raise
    return lock, aside


def replaceable_run_files(out, overwrite, config_file):
    """The run files that --overwrite may move aside, all of them train.py's, or refused with nothing
    touched: a config.toml that is a run's resolved config and not this command's config file, a ckpt.pt
    of train.py, a log and a summary that read as a run's, tracker folders (tb/, wandb/) that hold only what
    the trackers wrote (rundir.check_new_run checks the kinds of file and the ckpt/ folder)."""
    found = rundir.check_new_run(out, overwrite)

    def refuse(name, what):
        raise safe_io.RunDirError(f"{out / name} {what}: --overwrite replaces only what train.py wrote; move it away by hand")
    if "config.toml" in found:
        if config_file and Path(config_file).resolve() == (out / "config.toml").resolve():
            raise safe_io.RunDirError(f"{out / 'config.toml'} is the config file of this command: --overwrite would "
                                      f"replace it; copy it elsewhere first, or give another --out_dir")
        try:
            ours = is_run_config(read_toml(out / "config.toml"))
        except ValueError:
            ours = False
        if not ours:
            refuse("config.toml", "is not a run's config (train.py writes every [model] and [train] key)")
    if "ckpt.pt" in found and not checkpoint.looks_like_ours(out / "ckpt.pt"):
        refuse("ckpt.pt", "is not a checkpoint of train.py")
    if "log.jsonl" in found and (out / "log.jsonl").stat().st_size and not rundir.read_log(out / "log.jsonl"):
        refuse("log.jsonl", "holds no record of a run")
    if "summary.json" in found and rundir.read_summary(out / "summary.json") is None:
        refuse("summary.json", "is not a run's summary")
    for name, others in trackers.strangers(out, found).items():  # tb/, wandb/
        refuse(name, f"holds what no tracker wrote ({', '.join(others[:5])})")
    return found
