"""A run directory and the promise that nothing in it is lost.

    config.toml   the resolved config (what --resume reads)
    log.jsonl     one line per log interval and per evaluation
    ckpt.pt       model, optimizer, loader, RNG, step and schedule, with a checksum of all of it
    ckpt/         the same, sharded, under FSDP (checkpoint.py)
    summary.json  written when the run stops or finishes
    tb/, wandb/, wandb.json   TensorBoard's and W&B's files, when the run logs to them (trackers.py)
    .lock         held by the one process that writes here
    train.log     train.py's output, when sweep.py ran it beside other runs (harness/sweep_jobs.py)

Every file is written atomically and no file of a run is opened through a symbolic link (safe_io.py):
a run file that is a link is refused, named. A new run refuses a folder that holds a
run unless told to replace it, and then the old run is moved aside and deleted only once the new run
has written its config; a second writer is refused with the holder's pid; a damaged file is named and
never loaded; a full disk is reported with the file, the bytes needed and the bytes free.
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import sys
from pathlib import Path

from harness.interrupts import raise_held, signals_held
from harness.safe_io import (RunDirError, open_nofollow, own_file_problem, read_bytes, refuse_link,
                     write_failed, write_text)

RUN_FILES = ("config.toml", "log.jsonl", "ckpt.pt", "ckpt", "summary.json", "tb", "wandb", "wandb.json")
FOLDERS = {"ckpt": "sharded checkpoints", "tb": "TensorBoard events", "wandb": "W&B files"}  # the run files that are folders
ASIDE = ".replaced"  # where --overwrite keeps the old run until the new one has written its config


def utf8(text):
    """Whether text can be written as UTF-8 (a path of undecodable bytes holds lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def one_line(e, limit=300):
    """An error's message on one line, cut at limit characters (some packages' messages run over several)."""
    return " ".join(str(e).split())[:limit]


# ----------------------------------------------------------------------------- one writer
class Lock:
    """A lock on a run directory or a sweep's folder (flock on .lock, released by the kernel if the holder
    dies). Exclusive: one writer, whom the file names; a holder that died without releasing it is reported
    when it is taken over. Shared (`sweep.py run --only`, as a Slurm array runs it): many holders, each
    working in a run folder of its own under that run's own lock, and no exclusive holder meanwhile."""

    def __init__(self, out_dir, flag="--out_dir", shared=False, beside=False):
        self.folder = Path(out_dir)  # beside: a lock on a folder that is about to be replaced, in .<name>.lock beside it
        self.path = self.folder.parent / f".{self.folder.name}.lock" if beside else self.folder / ".lock"
        self.flag = flag  # the command line's name for the folder, for the refusal
        self.shared = shared
        self.fd, self.created = None, False

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no flock, so no lock is taken
            return self
        while True:
            self.fd, self.created = self._open()
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError:
                holder = self._read()
                self._close()
                raise RunDirError(f"{self.folder} is in use by {holder or 'another process'}: a second writer "
                                  f"would interleave its files; wait for it to end, or use another {self.flag}") from None
            if self._still_the_file():
                break
            self._close()  # its holder removed it as we locked it: lock the file that is there now
        if self.shared:
            return self  # the file names an exclusive holder only
        stale = self._read()
        if stale:
            warn(f"{self.folder}: the last writer ({stale}) ended without releasing its lock; taking it over")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        os.fsync(self.fd)
        return self

    def _open(self):
        """(fd, whether this process created the file): a lock file of its own, never through a link."""
        try:
            fd, created = open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            fd, created = open_nofollow(self.path, os.O_RDWR), False
        problem = own_file_problem(os.fstat(fd))
        if problem:
            os.close(fd)
            raise RunDirError(f"{self.path} is {problem}: a lock is a file of its own; move it away by hand")
        return fd, created

    def _still_the_file(self):
        try:
            here, ours = os.stat(self.path, follow_symlinks=False), os.fstat(self.fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def _close(self):
        os.close(self.fd)
        self.fd = None

    def _read(self):
        return os.pread(self.fd, 200, 0).decode(errors="replace").strip()

    def release(self):
        """Unlocked, and the lock file as it was: removed when this process made it (a refused command leaves
        nothing behind), else emptied (released cleanly). A shared holder leaves the file to the others."""
        if self.fd is None:
            return
        if not self.shared:
            if self.created and self._still_the_file():  # (a folder swapped away took it with it)
                os.unlink(self.path)  # still locked: whoever opened it meanwhile finds it gone (_still_the_file)
            else:
                os.ftruncate(self.fd, 0)
        self._close()


def run_files(out_dir):
    """The run files in out_dir (a link counts, to be refused)."""
    out = Path(out_dir)
    return [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]


OTHER_KINDS = {"meta.json": "prepared data (data.py)", "plan.json": "a sweep's folder (sweep.py)"}  # by the file that marks them


def other_kind(out_dir):
    """What a folder is when it is a folder of another program's (prepared data, a sweep), else None."""
    out = Path(out_dir)
    return next((kind for name, kind in OTHER_KINDS.items() if (out / name).exists() or (out / name).is_symlink()), None)


def check_new_run(out_dir, overwrite):
    """Refuse to start a run where one is, unless overwrite: then the run's files are checked (nothing is
    touched here) and returned, to be moved aside. A folder of another kind is never a run's."""
    out = Path(out_dir)
    found = run_files(out)
    if found and not overwrite:
        raise RunDirError(f"{out} holds a run ({', '.join(found)}): continue it with --resume, start another with "
                          f"--out_dir=…, or replace it with --overwrite=true")
    return check_run_files(out)


def check_run_files(out_dir):
    """The run files in out_dir, each what train.py writes there, or refused before anything is touched:
    no link, a plain file of its own (no other hard link) for each file, a folder for ckpt/ that holds
    nothing but checkpoints."""
    out = Path(out_dir)
    kind = other_kind(out)
    if kind:
        raise RunDirError(f"{out} holds {kind}: a run writes only into a folder of its own; give another --out_dir")
    found = run_files(out)
    for name in found:
        target = out / name
        refuse_link(target)
        if name in FOLDERS and not target.is_dir():
            raise RunDirError(f"{target} is not a folder: a run keeps its {FOLDERS[name]} there; move it away by hand")
        if name not in FOLDERS and (target.is_dir() or own_file_problem(target.stat())):
            problem = "a folder" if target.is_dir() else own_file_problem(target.stat())
            raise RunDirError(f"{target} is {problem} where a run keeps a file of its own: it is not train.py's; move "
                              f"it away by hand")
    if "ckpt" in found:
        strangers = [p for p in (out / "ckpt").iterdir() if not CKPT_ENTRY.fullmatch(p.name)]
        for step in (out / "ckpt").glob("step-*"):
            if CKPT_ENTRY.fullmatch(step.name) and step.is_dir() and not step.is_symlink():
                strangers += [p for p in step.iterdir() if not STEP_ENTRY.fullmatch(p.name)]
            elif CKPT_ENTRY.fullmatch(step.name):
                strangers.append(step)
        if strangers:
            names = sorted(str(p.relative_to(out / "ckpt")) for p in strangers)
            raise RunDirError(f"{out / 'ckpt'} holds files that are no checkpoint ({', '.join(names[:5])}): "
                              f"train.py would delete them; move them away by hand")
    return found


CKPT_ENTRY = re.compile(r"latest\.json|\.latest\.json\.\d+\.tmp|step-\d{8}")  # what checkpoint.save writes in ckpt/
STEP_ENTRY = re.compile(r"__\d+_\d+\.distcp|\.metadata|extra\.pt|\.extra\.pt\.\d+\.tmp")  # and in ckpt/step-<n>/
TEMPORARY = re.compile(r"\.(config\.toml|log\.jsonl|ckpt\.pt|summary\.json|latest\.json|extra\.pt|wandb\.json)\.(\d+)\.tmp")


def remove_temporaries(out_dir):
    """With the lock held: the temporary files of this run's atomic writes that killed writers left behind
    (their names, and processes that are no more)."""
    out = Path(out_dir)
    folders = [out, out / "ckpt", *(out / "ckpt").glob("step-*")]
    for folder in folders:
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                m = TEMPORARY.fullmatch(p.name)
                if m and (p.is_file() or p.is_symlink()) and not alive(int(m.group(2))):
                    p.unlink()


def alive(pid):
    """Whether a process of this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class Aside:
    """--overwrite's hold on the old run: its files moved into out_dir/.replaced/ (renames, nothing
    copied), deleted once the new run has written its config, put back if the new run fails before.
    The renames run with Ctrl-C and SIGTERM held back; a kill in between leaves the files there, and
    recover() puts them back or deletes them, whichever was due."""

    def __init__(self, out_dir):
        self.out = Path(out_dir)
        self.path = self.out / ASIDE
        self.marker = self.path / ".moved"  # written once every file is aside: a config.toml then is the new run's
        self.ours = False  # this process moved them

    def move(self, names):
        if names:
            with signals_held() as came:
                self.ours = True
                self.path.mkdir()
                for name in names:  # config.toml first (RUN_FILES' order)
                    os.rename(self.out / name, self.path / name)
                write_text(self.marker, "")
            raise_held(came)
        return self

    def discard(self):
        if self.path.exists():  # renamed first: a kill while deleting never leaves a half that looks whole
            doomed = self.path.with_name(f"{ASIDE}.deleting-{os.getpid()}")
            os.rename(self.path, doomed)
            shutil.rmtree(doomed)

    def undo(self):
        """Put back what this process moved aside (the new run failed before its config was written)."""
        if self.ours:
            self.restore()

    def restore(self):
        if not self.path.exists():
            return
        clash = [p.name for p in self.path.iterdir() if (self.out / p.name).exists() or (self.out / p.name).is_symlink()]
        if clash:
            raise RunDirError(f"{self.path} holds a run that an --overwrite moved aside, and {self.out} holds files of "
                              f"the same names ({', '.join(sorted(clash))}): keep one of them, by hand")
        with signals_held() as came:
            self.marker.unlink(missing_ok=True)  # first: a restore stopped halfway is finished by recover()
            for p in self.path.iterdir():
                os.rename(p, self.out / p.name)
            self.path.rmdir()
        raise_held(came)

    def recover(self):
        """Called with the lock held, before anything else: finish what a killed --overwrite left."""
        for doomed in [*self.out.glob(f"{ASIDE}.deleting-*"), self.path]:
            if (doomed.exists() or doomed.is_symlink()) and (doomed.is_symlink() or not doomed.is_dir()):
                raise RunDirError(f"{doomed} is not a folder an --overwrite made (a link, or a file): move it away by hand")
        for doomed in self.out.glob(f"{ASIDE}.deleting-*"):
            shutil.rmtree(doomed)
        if not self.path.exists():
            return
        if self.marker.exists() and "config.toml" in run_files(self.out):
            self.discard()  # the new run had written its config: the old one was due for deletion
            return
        warn(f"{self.out}: an --overwrite was stopped before the new run began; the old run is put back")
        self.restore()


# ----------------------------------------------------------------------------- checkpoints
def checksum(obj, h=None):
    """sha256 over a checkpoint's contents: every tensor's dtype, shape and bytes, every other value's repr."""
    import torch  # here, not at the top: planners (sweep.py plan) write files without loading torch
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            checksum(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            checksum(v, h)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(obj).encode())
    return h


def saved_bytes(obj):
    """At least the size of torch.save's file of obj: each tensor's bytes and RECORD for its entry in the
    zip archive (header, name, alignment), and the pickle of everything else (what the pre-check needs)."""
    import torch

    def walk(x):  # (tensor bytes, tensors, x with its tensors taken out)
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size(), 1, None
        if isinstance(x, dict):
            parts = {k: walk(v) for k, v in x.items()}
            return sum(b for b, _, _ in parts.values()), sum(n for _, n, _ in parts.values()), \
                {k: rest for k, (_, _, rest) in parts.items()}
        if isinstance(x, (list, tuple)):
            parts = [walk(v) for v in x]
            return sum(b for b, _, _ in parts), sum(n for _, n, _ in parts), [rest for _, _, rest in parts]
        return 0, 0, x
    nbytes, tensors, rest = walk(obj)
    return nbytes + RECORD * tensors + len(pickle.dumps(rest)) + ARCHIVE


RECORD = 512   # bytes a tensor's entry adds to torch.save's zip archive and pickle, at most (measured: 300-320)
ARCHIVE = 4096  # the archive's own entries and directory (measured: about 1,300 bytes)


# ----------------------------------------------------------------------------- log and summary
LOG_KINDS = ("train", "eval")


def append_log(path, record):
    """One line, flushed: a kill loses at most the line being written, which read_log then drops."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    problem = own_file_problem(os.fstat(fd))
    if problem:
        os.close(fd)
        raise RunDirError(f"{path} is {problem}: a run's log is a file of its own; move it away by hand")
    try:
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
    except OSError as e:
        raise write_failed(path, e, "its earlier lines are kept") from None


def read_log(path):
    """The records of log.jsonl, each a JSON object with a kind and a step; a torn last line (a kill
    mid-write) is dropped with a warning, any other damage is named with its line."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return []
    lines = read_bytes(path).decode("utf-8", errors="replace").split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if any(rest.strip() for rest in lines[n:]):
                raise RunDirError(f"{path}:{n} is damaged (not a JSON line) and is not the last line") from None
            warn(f"{path}:{n}: dropped a torn last line (the run was stopped while writing it)")
            continue
        if not (isinstance(record, dict) and record.get("kind") in LOG_KINDS and is_count(record.get("step"))
                and all(is_number(v) for k, v in record.items() if k.startswith("bpc_"))):
            raise RunDirError(f"{path}:{n} is damaged: expected a JSON object with a kind ({' or '.join(LOG_KINDS)}), "
                              f"a step (an integer >= 0) and finite bits per character")
        records.append(record)
    return records


class NotTrueOrFalse(argparse.ArgumentTypeError, ValueError):
    """A flag that is no bool: argparse prints this message as it is; config.py names the key."""


def true_or_false(text):
    """A flag's text as a bool: true/false (or 1/0, yes/no, on/off)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise NotTrueOrFalse(f"expected true or false, got {text!r}")


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def truncate_log(path, step):
    """On resume: keep the records up to the checkpoint's step (a killed run may have logged past it)."""
    records = [r for r in read_log(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def summary_problem(summary):
    """What makes a summary.json unusable, or None: the fields that train.py, sweep.py and the report read."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    if not isinstance(summary.get("finished"), bool) or not is_count(summary.get("step")):
        return "no finished (true or false) and step (an integer >= 0)"
    final = summary.get("final")
    if not isinstance(final, dict) or not all(isinstance(k, str) and is_number(v) for k, v in final.items()):
        return "final is not a table of bits per character"
    config = summary.get("config")
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict) and isinstance(config.get("train"), dict)):
        return "config has no [model] and [train] tables"
    return None


def read_summary(path):
    """summary.json, or None when it is missing or damaged (then it is written again, with a warning)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return None
    refuse_link(path)
    try:
        summary = json.loads(read_bytes(path))
        problem = summary_problem(summary)
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError, RecursionError):
        problem = "not a JSON object"
    if problem is None:
        return summary
    warn(f"{path} is damaged ({problem}): it is ignored and will be written again")
    return None


def finished(summary):
    """Whether a run with this summary (from read_summary) has finished, with its final evaluation."""
    return bool(summary and summary["finished"] and summary["final"])
