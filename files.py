"""
files.py -- files written so that a crash never leaves half of one, and JSON files read field by field.

  1. atomic writes: every file selm writes goes to a temporary name in a private folder beside
     it (TMP_PREFIX<pid>-*/, a name no other program uses, so that outdir.sweep can tell what a
     killed selm process left), is fsynced, then renamed over the file, with the permissions
     the umask gives; a failure the OS explains (a full disk) is a WriteError naming the file;
  2. reading: whether a path is a file to read at all, a JSON file in one line of error, and
     `Fields`, the fields of a JSON object (config.json, tokenizer.json, ...) each checked as it
     is read.

This file imports only the standard library: every chapter may use it.
"""

import json
import math
import os
import re
import shutil
import tempfile

# -----------------------------------------------------------------------------
# 1. Atomic writes

# The name of every temporary folder selm makes, then TMP_PREFIX<pid>-<random>: a name no other
# program uses, so a start-up sweep (outdir.sweep) can tell what a killed selm process left
TMP_PREFIX = ".selm-tmp-"


def atomic_write_path(path, save):
    """Write a file so that a crash never leaves half of it: save(temporary path), fsync, then a
    rename, so readers see the old file or the new one, with the mode the umask gives. The
    temporary path is `path`'s name in a private folder beside it, TMP_PREFIX<pid>-*/: a writer's
    own temporary files (safetensors') stay in there, and a format read from the extension
    (matplotlib's) is right. A failure the OS explains (a full disk, a quota) is a WriteError
    naming `path`."""
    tmp_dir = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f"{TMP_PREFIX}{os.getpid()}-")
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after the writer: safetensors renames a private (0600) file over ours
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        error = write_error(e, path)
        if error is None:
            raise
        raise error from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write(path, write, binary=True):
    """Call write(file) on a file opened at a temporary path, then rename it (atomic_write_path):
    a crash leaves either the old file or the new one, never half of one."""
    def save(tmp):
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
    atomic_write_path(path, save)


def write_json_atomic(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), binary=False)


def write_jsonl_atomic(path, records):
    """Records (JSON objects) as a JSON Lines file, one per line, UTF-8, written atomically."""
    def save(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_path(path, save)


class WriteError(OSError):
    """A file could not be written; its message is one line: what the OS said, and the file."""

    def __str__(self):
        return self.strerror


def write_error(e, path):
    """A WriteError naming `path` when an errno explains `e`: its own, that of the OSError torch
    keeps as its RuntimeError's context, or the one safetensors names ("os error N"); else None."""
    cause = e
    while cause is not None:
        named = re.search(r"\(os error (\d+)\)", str(cause))
        code = getattr(cause, "errno", None) or (named and int(named.group(1)))
        if code:
            what = os.strerror(code)
            return WriteError(code, f"{what[:1].lower()}{what[1:]} writing {path}")
        cause = cause.__cause__ or cause.__context__
    return None


def _umask():
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


# -----------------------------------------------------------------------------
# 2. Reading: a file to read, JSON, and the fields of a JSON object

def file_problem(path):
    """Why `path` is no file to read, in a few words; None for a regular file (or a link to
    one). A FIFO or a device is no file: a reader would wait forever or read nothing."""
    if os.path.isdir(path):
        return "is a directory, not a file"
    if not os.path.exists(path):
        return "a link to nothing" if os.path.islink(path) else "does not exist"
    if not os.path.isfile(path):
        return "is not a regular file (a FIFO, a socket or a device)"
    return None


def read_json(path):
    """The JSON in a file, or a ValueError in one line naming it: unreadable, not UTF-8, not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise ValueError(f"{path}: unreadable JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e.strerror if isinstance(e, OSError) else e})") from None


class Fields:
    """The fields of a JSON object read from a Hugging Face file (config.json, tokenizer.json,
    ...), each checked as it is read: of its type, in its range; else a ValueError in one line
    naming the file and the field. A field that is absent or null takes its default; one
    without a default must be there. `path` prefixes the names of a nested object's fields."""

    def __init__(self, obj, where, what="the file", path=""):
        if not isinstance(obj, dict):
            name = f"field {path[:-1]!r}" if path else "the file"
            raise ValueError(f"{where}: {name} must be a JSON object, got {json.dumps(obj)[:60]}")
        self.obj, self.where, self.what, self.path = obj, where, what, path

    @classmethod
    def of(cls, path):
        """The fields of a JSON file that may be absent (tokenizer_config.json, ...): none then."""
        return cls(read_json(path) if os.path.isfile(path) else {}, path)

    def get(self, name, default=..., ok=None, want=None):
        value = self.obj.get(name)
        if value is None:
            if default is ...:
                raise ValueError(f"{self.where}: {self.what} lacks {self.path + name!r}")
            return default
        if ok is not None and not ok(value):
            raise ValueError(f"{self.where}: field {self.path + name!r} must be {want}, got {json.dumps(value)[:60]}")
        return value

    def count(self, name, default=..., lo=1):
        return self.get(name, default, lambda v: type(v) is int and v >= lo, f"an integer >= {lo}")

    def number(self, name, default=..., lo=0.0, strict=True):
        """A finite number above `lo` (strict) or from `lo` on."""
        return self.get(name, default, lambda v: type(v) in (int, float) and (v > lo if strict else v >= lo)
                        and math.isfinite(v), f"a finite number {'>' if strict else '>='} {lo:g}")

    def flag(self, name, default=False):
        return self.get(name, default, lambda v: type(v) is bool, "true or false")

    def text(self, name, default=...):
        return self.get(name, default, lambda v: type(v) is str, "a string")

    def array(self, name, ok=lambda v: True, want="a list"):
        return self.get(name, [], lambda v: type(v) is list and all(ok(x) for x in v), want)

    def nested(self, name):
        return Fields(self.get(name, {}), self.where, self.what, f"{self.path}{name}.")

    def check(self, bad, message):
        if bad:
            raise ValueError(f"{self.where}: {message}")
