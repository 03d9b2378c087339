"""A prepared data folder and its one writer: data.py prepares into a fresh folder beside --out, then puts it
in --out's place. What may be replaced is checked at the start and again at the swap, under a lock beside the
folder (every data.py swapping there takes it) and the folder's own (a run writing there holds it): a run
or another data.py's data that came meanwhile is never deleted; a failure leaves --out as it was.
"""
import contextlib
import errno
import glob
import json
import os
import shutil
from pathlib import Path

from harness import rundir
from harness import safe_io


def check_out(out_dir, overwrite):
    """A folder that holds prepared data is replaced only when asked (runs may be reading it), and a folder
    that holds anything else never: preparing replaces the whole folder. Prepared data is a meta.json file
    and <split>.bin files, nothing else."""
    out = Path(out_dir)
    if not str(out_dir).strip() or not out.absolute().name:
        raise ValueError(f"--out={str(out_dir)!r}: expected a folder to prepare the data into")
    safe_io.refuse_link(out)
    if safe_io.folder_problem(out):
        raise ValueError(f"--out={out} is {safe_io.folder_problem(out)}: expected a folder")
    if not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"]:  # new, or empty but for a lock
        return
    files = prepared_files(out)
    others = sorted(p.name for p in out.iterdir() if p.name != ".lock" and  # (held by this data.py at the swap)
                    (files is None or p.name not in files or not p.is_file() or p.is_symlink()))
    if others:
        raise ValueError(f"--out={out} holds {'other files than prepared data' if files else 'files and no meta.json of data.py'} "
                         f"({', '.join(others[:5])}{', …' if len(others) > 5 else ''}): expected a new or empty folder, "
                         f"or one data.py prepared")
    if not overwrite:
        raise ValueError(f"--out={out} holds prepared data already (meta.json): give --overwrite to prepare it again")


def prepared_files(folder):
    """The files of a folder that data.py prepared (of any format): meta.json and the token file of each split
    it lists; None when its meta.json is no data.py's."""
    try:
        meta = json.loads(safe_io.read_bytes(Path(folder) / "meta.json"))
        splits = meta["splits"]
        if not (isinstance(meta.get("format"), int) and isinstance(splits, dict) and splits and all(
                isinstance(v, dict) and v.get("file") == f"{k}.bin" for k, v in splits.items())):
            return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return {"meta.json", *(f"{name}.bin" for name in splits)}


@contextlib.contextmanager
def held_for_swap(out, overwrite):
    """out held while the new data takes its place: the lock beside it that every data.py swapping into out
    takes, and out's own lock (a run's writer holds it), then out checked again as at the start: what a run
    or another data.py put there meanwhile is never deleted."""
    beside = rundir.Lock(out, "--out", beside=True).acquire()
    inside = None
    try:
        if out.is_dir():
            inside = rundir.Lock(out, "--out").acquire()
        check_out(out, overwrite)
        yield
    finally:
        if inside:
            inside.release()
        beside.release()


def fresh(out):
    """A new folder .<name>.<pid>.tmp beside out, with the permissions of a folder made here (umask), after
    removing what a killed data.py left there (folders of processes that are no more)."""
    for old in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        pid = old.name[len(out.name) + 2:-4]
        if pid.isdigit() and old.is_dir() and not old.is_symlink() and not rundir.alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    new = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(new, ignore_errors=True) if new.is_dir() and not new.is_symlink() else None
    new.mkdir()
    return new





def discard(new, out, error):
    """The fresh folder of a preparation that failed, removed; a full disk named with the folder and the sizes."""
    written = sum(f.stat().st_size for f in new.rglob("*") if f.is_file())
    shutil.rmtree(new, ignore_errors=True)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise safe_io.RunDirError(f"{out}: the disk is full (more than the {written:,} bytes written when it ran out "
                                  f"needed, {shutil.disk_usage(out.parent).free:,} free); {out} is as it was") from None
