"""Reading and writing files: the project's one atomic writer, a JSON reader whose errors name the file, and the lock
that keeps a second run off a busy output folder.

The bottom layer: it imports nothing of the project's, and every module that writes a file goes through it.
"""
import json
import os
import time

_REQUIRED = object()


def atomic_write(path, write):
    """Write through a temporary file in the same folder (write(tmp)), then os.replace: a reader or a crash never
    sees a half-written file. The one writer every file of the project goes through."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path, default=_REQUIRED, error=ValueError):
    """json.load with `error`s naming the file (line and column for malformed JSON); a missing file gives `default`
    when one is given."""
    path = str(path)
    if not os.path.exists(path):
        if default is not _REQUIRED:
            return default
        raise error(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def folder_problem(path) -> str | None:
    """Why `path` cannot be (or become) a writable folder, or None: it is a file, a file stands where a parent folder
    should, or the nearest existing folder refuses a new file (tried, then removed)."""
    path = os.path.abspath(str(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is a file"
    probe = os.path.join(parent, f".probe.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.remove(probe)
    except OSError as e:
        return f"is not writable ({parent}: {e.strerror})"
    return None


# ----------------------------------------------------------------------------------------------------
# one run per output folder

class LockError(ValueError):
    """The output folder is held by another run (or its lock is unreadable)."""


def _started(pid: int):
    """The kernel's start time of process `pid` (/proc/<pid>/stat, field 22): with the PID it names one process even
    after the PID is reused; None when no such process runs (or no /proc: then only whether the PID exists)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        if os.path.isdir("/proc"):
            return None
        try:
            os.kill(pid, 0)
            return "alive"
        except OSError:
            return None


def lock_out(out) -> str:
    """OUT/.lock, created exclusively, holds this process's PID and start time: a second run on a busy --out stops
    (LockError naming the holder); a lock whose process is gone, as after a kill, is taken over."""
    path = os.path.join(out, ".lock")
    me = {"pid": os.getpid(), "start": _started(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = read_json(path)
                alive = holder["start"] is not None and _started(int(holder["pid"])) == holder["start"]
            except (ValueError, KeyError, TypeError):
                raise LockError(f"{path} is unreadable: another run may be starting on {out}; if none is, delete "
                                 "the file") from None
            if alive:
                raise LockError(f"{out} is in use by another run: PID {holder['pid']}, started {holder['since']}; "
                                 "wait for it to finish or use another --out") from None
            os.remove(path)                                        # its process is gone: a stale lock
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise LockError(f"{path}: could not take the lock (another run took it first)")
