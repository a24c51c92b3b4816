"""Reading and writing files: the project's one atomic writer and a JSON reader whose errors name the file.

The bottom layer: it imports nothing of the project's, and every module that writes a file goes through it.
"""
import json
import os

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
