"""Files read and written so that nothing is lost: opened without following links (a link or a FIFO in
a run's place is refused, named), read as plain files only, written atomically (a temporary file of
this process, flushed, synced and renamed: a kill leaves the old file or the new one, never half of one),
folders swapped in one step, and a full disk reported with the bytes needed and free.
"""
import errno
import hashlib
import os
import shutil
import stat
import tomllib
from pathlib import Path


class RunDirError(ValueError):
    """A run directory that cannot be used as asked: exit code 2, with the file named."""


# ----------------------------------------------------------------------------- opening without links
def open_nofollow(path, flags, mode=0o644):
    """os.open that never goes through a symbolic link at path: a link there is refused, named."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or Path(path).is_symlink():
            raise link_refused(path) from None
        raise


def link_refused(path):
    return RunDirError(f"{path} is a symbolic link: a run's files are never opened through a link (it could "
                       f"point anywhere); remove the link")


def own_file_problem(st):
    """Why a file (its stat) is not one a run may write in place, or None: a FIFO or a device, or a file with
    other hard links, whose other names would change with it (a symbolic link is refused on opening)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a plain file"
    if st.st_nlink > 1:
        return f"a file with {st.st_nlink - 1} other hard link(s)"
    return None


def refuse_link(path):
    if Path(path).is_symlink():
        raise link_refused(path)


def open_plain(path, follow=False):
    """A plain file opened for reading: never a FIFO or a device (which could block forever), and never
    through a link unless follow (a user's input may be one; a run's files never are)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags) if follow else open_nofollow(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"{path} is not a plain file")
    return os.fdopen(fd, "rb")


def sha256_file(path, follow=False):
    """A file's sha256, read as a plain file (open_plain), in one streamed pass (sha256_stream)."""
    with open_plain(path, follow) as f:
        return sha256_stream(f)


BLOCK = 1 << 24  # bytes per read when hashing: few system calls, and hashlib releases the GIL on each block


def sha256_stream(f, size=None):
    """The sha256 (hex) of the next size bytes of the open file f (all that is left when None), read in one
    pass of BLOCK-sized reads into one reused buffer. A file shorter than size gives the hash of what it has."""
    h = hashlib.sha256()
    buffer = memoryview(bytearray(BLOCK))
    left = float("inf") if size is None else size
    while left > 0:
        n = f.readinto(buffer[:min(BLOCK, left)])
        if not n:
            break
        h.update(buffer[:n])
        left -= n
    return h.hexdigest()


class HashingWriter:
    """A file's writes passed on and hashed as they go: the sha256 of exactly the bytes written, computed in
    the same pass. torch.save writes through it (it calls write and flush only)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def folder_problem(path):
    """Why path cannot be (or become) a folder, or None: a file, a link to nothing, a file on the way."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "a link to nothing"
    if path.exists() and not path.is_dir():
        return "a file"
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            return f"inside {parent}, which is a file"
    return None


def path_problem(path):
    """Why a folder's path, as given (data.py --out, train.data, train.out_dir), cannot name a folder, or None:
    blank, not printable, not UTF-8, or a file where a folder would be. One rule, so that every folder data.py
    prepares is one train.py reads."""
    if not path.strip():
        return "empty"
    if not path.isprintable():
        return f"not printable: it holds {next(c for c in path if not c.isprintable())!r}"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8 (bytes of another encoding)"
    return folder_problem(path)


def read_bytes(path, follow=False):
    """A plain file's bytes (open_plain)."""
    with open_plain(path, follow) as f:
        return f.read()


def load_toml(path):
    """A TOML file as a dict; a missing, unreadable or malformed file is named in one ValueError."""
    try:
        return tomllib.loads(read_bytes(path, follow=True).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and RunDirError are ValueErrors
        raise ValueError(e if str(path) in str(e) else f"{path}: {e}") from None


# ----------------------------------------------------------------------------- atomic writes
def atomic_write(path, write, needed=0):
    """write(f) into a temporary file beside path, then flush, fsync and rename it over path. With the
    disk full (or fewer than `needed` bytes free), nothing is left behind and path is untouched. Neither
    path nor the temporary file is ever a symbolic link that the write would go through."""
    path = Path(path)
    refuse_link(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise disk_full(path, needed, free)
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a dead process with this pid (a link is removed, not followed)
        with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        failed = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if not isinstance(failed, OSError):
            raise
        raise write_failed(path, failed, f"the previous {path.name} is untouched", needed) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a power cut only once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_folder(new, old):
    """Put the folder new in old's place (old may not exist), then delete what old held. On Linux the two
    are exchanged in one step (renameat2 RENAME_EXCHANGE), so a kill at any point leaves one whole folder
    at old; elsewhere old is renamed aside first and deleted once new is in place."""
    new, old = Path(new), Path(old)
    refuse_link(old)
    if not old.exists():
        os.rename(new, old)
        return
    if _exchange(new, old):
        shutil.rmtree(new)  # it holds the old contents now
        return
    aside = old.with_name(f".{old.name}.old-{os.getpid()}")
    os.rename(old, aside)
    os.rename(new, old)
    shutil.rmtree(aside)


def _exchange(a, b):
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def check_replaceable(path, ours, what):
    """An output file is written over only when it is one of ours (ours(bytes)); anything else of that name
    is named and kept (a typo in --json must not replace a run's summary)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        try:
            mine = ours(read_bytes(path))
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):  # unreadable, or no such content
            mine = False
        if not mine:
            raise RunDirError(f"{path} exists and is not {what}: it is kept; move it away, or write elsewhere")


def write_failed(path, error, kept, needed=0):
    """The one line for a write to path that failed with the OSError error: the disk full (with the bytes),
    a file-size limit, or whatever the system said; and `kept`, what is as it was."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(path, needed, shutil.disk_usage(Path(path).parent).free, kept)
    limit = ", past the file-size limit (ulimit -f)" if error.errno == errno.EFBIG else ""
    return RunDirError(f"{path}: could not be written ({error.strerror or error}{limit}); {kept}")


def disk_full(path, needed, free, kept=None):
    """The one line for a disk too full to write path: the bytes needed (an estimate, which a write that ran
    out of space proved short when it is not above what is free) and the bytes free."""
    need = f"{needed:,} bytes needed" if needed > free else "more bytes needed"
    return RunDirError(f"{path}: the disk is full ({need}, {free:,} free); {kept or f'the previous {path.name} is untouched'}")


def write_text(path, text):
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), len(data))
