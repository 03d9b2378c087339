"""A run directory and the promise that nothing in it is lost.

    config.toml   the resolved config (what --resume reads)
    log.jsonl     one line per log interval and per evaluation
    ckpt.pt       model, optimizer, loader, RNG, step and plan, with a checksum of all of it
    ckpt/         the same, sharded, under FSDP (checkpoint.py)
    summary.json  written when the run stops or finishes
    .lock         held by the one process that writes here

Every file is written atomically: a temporary file of this process, flushed, synced and renamed, so a
kill leaves the old file or the new one, never half of one. A new run refuses a folder that holds a run
unless told to replace it; a second writer is refused with the holder's pid; a damaged file is named
and never loaded; a full disk is reported with the file, the bytes needed and the bytes free.
"""
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

RUN_FILES = ("config.toml", "log.jsonl", "ckpt.pt", "ckpt", "summary.json")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked: exit code 2, with the file named."""


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- atomic writes
def atomic_write(path, write, needed=0):
    """write(f) into a temporary file beside path, then flush, fsync and rename it over path. With the
    disk full (or fewer than `needed` bytes free), nothing is left behind and path is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise disk_full(path, needed, free)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, needed or None, shutil.disk_usage(path.parent).free) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a power cut only once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_full(path, needed, free):
    need = f"{needed:,} bytes needed" if needed else "more bytes needed"
    return RunDirError(f"{path}: the disk is full ({need}, {free:,} free); the previous {path.name} is untouched")


def write_text(path, text):
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), len(data))


# ----------------------------------------------------------------------------- one writer
class Lock:
    """An exclusive lock on a run directory (flock on .lock, released by the kernel if the holder dies).
    The file names its holder; a holder that died without releasing it is reported when it is taken over."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / ".lock"
        self.fd = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read()
            os.close(self.fd)
            self.fd = None
            raise RunDirError(f"{self.path.parent} is in use by {holder or 'another process'}: a second writer would "
                              f"interleave its files; wait for it to end, or use another --out_dir") from None
        stale = self._read()
        if stale:
            warn(f"{self.path.parent}: the last writer ({stale}) ended without releasing its lock; taking it over")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        os.fsync(self.fd)
        return self

    def _read(self):
        return os.pread(self.fd, 200, 0).decode(errors="replace").strip()

    def release(self):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly
            os.close(self.fd)
            self.fd = None


def check_new_run(out_dir, overwrite):
    """Refuse to start a run where one is, unless overwrite: then delete its files (after the lock is held)."""
    out = Path(out_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise RunDirError(f"{out} holds a run ({', '.join(found)}): continue it with --resume, start another with "
                          f"--out_dir=…, or replace it with --overwrite=true")
    for name in found:
        target = out / name
        if name == "ckpt" and target.is_dir():  # a sharded checkpoint (checkpoint.py)
            shutil.rmtree(target)
        elif target.is_dir():
            raise RunDirError(f"{target} is a directory: remove it by hand")
        else:
            target.unlink()


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


def tensor_bytes(obj):
    import torch
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return obj.numel() * obj.element_size() if isinstance(obj, torch.Tensor) else 0


def save_checkpoint(path, state):
    """Atomically, with the checksum of everything saved; refused before writing if the disk cannot hold it."""
    import torch
    state = {**state, "sha256": checksum(state).hexdigest()}
    atomic_write(path, lambda f: torch.save(state, f), needed=tensor_bytes(state))


def read_checkpoint(path):
    """A checkpoint whose contents match its checksum; anything else is named and refused, never loaded."""
    import torch
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"{path} is a directory, not a checkpoint")
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, text, not a zip: torch raises many kinds
        raise RunDirError(f"{path} is damaged and was not loaded: it cannot be read as a checkpoint "
                          f"({type(e).__name__}: {str(e).strip()[:120]})") from None
    if not isinstance(state, dict) or "sha256" not in state:
        raise RunDirError(f"{path} has no checksum: it is not a checkpoint of this train.py (or an older one's)")
    saved = state.pop("sha256")
    if checksum(state).hexdigest() != saved:
        raise RunDirError(f"{path} is damaged and was not loaded: its contents do not match the checksum saved with them")
    return state


# ----------------------------------------------------------------------------- log and summary
def append_log(path, record):
    """One line, flushed: a kill loses at most the line being written, which read_log then drops."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_log(path):
    """The records of log.jsonl; a torn last line (a kill mid-write) is dropped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[n:]):
                raise RunDirError(f"{path}:{n} is damaged (not a JSON line) and is not the last line") from None
            warn(f"{path}:{n}: dropped a torn last line (the run was stopped while writing it)")
    return records


def truncate_log(path, step):
    """On resume: keep the records up to the checkpoint's step (a killed run may have logged past it)."""
    records = [r for r in read_log(path) if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def read_summary(path):
    """summary.json, or None when it is missing or damaged (then it is written again, with a warning)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        if isinstance(summary, dict):
            return summary
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    warn(f"{path} is damaged (not a JSON object): it is ignored and will be written again")
    return None
