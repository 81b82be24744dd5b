"""
checkpoint.py -- what a run leaves on disk, written so that a crash never corrupts it.

Every file goes through `atomic_write`: a temporary file in the same directory, fsync, then
a rename, so a reader sees the old file or the new one, never half of one. Checkpoints are
read with weights_only=True: a checkpoint file cannot run code.
"""

import os
import tempfile
from dataclasses import fields

import torch

from model import GPT, GPTConfig


def atomic_write(path, write, binary=True):
    """Call write(file) on a temporary file in the same directory, fsync, then rename: a
    crash leaves either the old file or the new one, never half of one."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint with weights_only=True (a checkpoint cannot run code). Errors are
    one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupted, or not a torch file at all
        raise ValueError(f"checkpoint {path} is unreadable: truncated, corrupted, not a checkpoint, "
                         f"or holding more than tensors ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a selm checkpoint (needs 'model' and 'model_config')")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Build a GPT from a checkpoint dict (see load_checkpoint) and load its weights."""
    known = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
    model = GPT(config)
    sd = ckpt["model"]
    want = model.state_dict()
    bad = [k for k in want if k not in sd or sd[k].shape != want[k].shape]
    if bad or set(sd) - set(want):
        raise ValueError(f"checkpoint {path} does not match its model configuration "
                         f"({bad[0] if bad else sorted(set(sd) - set(want))[0]})")
    model.load_state_dict(sd)
    return model
