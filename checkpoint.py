"""
checkpoint.py -- what a run leaves on disk, written so that a crash never corrupts it.

Every file goes through `files.atomic_write`: a temporary file beside it, fsync, then a rename, so
a reader sees the old file or the new one, never half of one, with the permissions the umask
gives; a full disk is one line naming the file (files.WriteError). Checkpoints are
read with weights_only=True: a checkpoint file cannot run code.

A run's directory holds one checkpoint per completed stage (sft.pt, dpo.pt, selm_1.pt, ...),
metrics.jsonl and results.json; outdir.py finds where a killed run stopped (--resume) and
copies another run's finished stages into a new run (--start-from).
"""

import hashlib
import math
import os
import re
from dataclasses import asdict, fields

import torch

from files import atomic_write, file_problem, write_json_atomic
from model import GPT, GPTConfig


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Read a checkpoint with weights_only=True (a checkpoint cannot run code), its fields
    checked (check_fields). Errors are one line naming the file. mmap: map the tensors instead
    of reading them, for a look at a checkpoint's fields that costs no memory."""
    check_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, corrupted, or not a torch file at all
        raise ValueError(f"checkpoint {path} is unreadable: truncated, corrupted, not a checkpoint, "
                         f"or holding more than tensors ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a selm checkpoint (needs 'model' and 'model_config')")
    return check_fields(ckpt, path)


def check_checkpoint_path(path):
    """A FileNotFoundError in one line unless `path` is a regular file: a directory, a FIFO or
    a device, or nothing."""
    if os.path.isdir(path):
        stages = sorted(f for f in os.listdir(path) if f.endswith(".pt"))
        raise FileNotFoundError(f"checkpoint {path} is a directory; give one of its checkpoint files"
                                + (f" ({', '.join(stages)})" if stages else " (it holds none)"))
    problem = file_problem(path)
    if problem:
        raise FileNotFoundError(f"checkpoint {path}: {problem}")


# The fields of a checkpoint besides its weights, and their types: those train.py writes
# (stage_state, train.about), each checked where present, so that a field of another type is
# one line naming it rather than a traceback wherever it is read
FIELDS = {"model": dict, "model_config": dict, "stage": str, "config": dict, "results": list,
          "optimizer": (dict, type(None)), "rng": torch.Tensor, "evaluated": bool, "stage_index": int,
          "sft_answers": (list, type(None)), "metrics_size": int, "tokenizer": (dict, str), "prompt_template": str,
          "conversational": bool}
RUN_FIELDS = ("stage", "config", "results", "sft_answers")  # what --resume and --start-from continue from


def check_fields(ckpt, path, need=()):
    """ckpt, once each of its FIELDS has its type, its model_config makes a model (model_config)
    and it has every field of `need`; else a ValueError naming the checkpoint and the field."""
    for name in need:
        if name not in ckpt:
            raise ValueError(f"checkpoint {path} lacks field {name!r}: it is not a stage checkpoint of train.py")
    for name, kind in FIELDS.items():
        if name in ckpt and (not isinstance(ckpt[name], kind) or type(ckpt[name]) is bool and kind is int):
            raise ValueError(f"checkpoint {path}: field {name!r} must be {_kind_name(kind)}, "
                             f"got {type(ckpt[name]).__name__}")
    if "stage" in ckpt and not STAGE.fullmatch(ckpt["stage"]):
        raise ValueError(f"checkpoint {path}: field 'stage' is {ckpt['stage'][:40]!r}, no stage of train.py")
    saved_tok = ckpt.get("tokenizer") if isinstance(ckpt.get("tokenizer"), dict) else {}
    if ckpt.get("metrics_size", 0) < 0 or not all(isinstance(r, dict) for r in ckpt.get("results", [])) \
            or not all(isinstance(a, str) for a in ckpt.get("sft_answers") or []) \
            or not all(isinstance(saved_tok.get(k), (str, type(None))) for k in ("name", "source")):
        raise ValueError(f"checkpoint {path}: its metrics_size, results, sft_answers or tokenizer are not what "
                         "train.py writes")
    model_config(ckpt, path)
    return ckpt


def _kind_name(kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else "a tensor" if k is torch.Tensor else k.__name__ for k in kinds)


WANT = {int: "an integer >= 1", float: "a finite number >= 0", bool: "true or false", str: "a string",
        dict: "an object"}


def model_config(ckpt, path="checkpoint"):
    """The GPTConfig of a checkpoint's model_config, each field of the type GPTConfig gives it
    (sizes at least 1, rates finite and not negative); unknown fields are ignored."""
    known = {f.name: f for f in fields(GPTConfig)}
    raw = {k: v for k, v in ckpt["model_config"].items() if k in known}
    for name, value in raw.items():
        want, default = known[name].type, known[name].default
        if value is None and default is None:
            continue
        ok = type(value) is want or want is float and type(value) is int
        ok = ok and (want is not int or value >= 1) and (want is not float or 0 <= value < math.inf)
        if not ok:
            raise ValueError(f"checkpoint {path}: model_config field {name!r} must be {WANT[want]}, "
                             f"got {value!r:.40}")
    try:
        return GPTConfig(**raw)
    except (AssertionError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"checkpoint {path}: its model_config describes no model ({e})") from None


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Build a GPT from a checkpoint dict (see load_checkpoint) and load its weights."""
    model = GPT(model_config(ckpt, path))
    sd = ckpt["model"]
    want = model.state_dict()
    bad = [k for k in want if not isinstance(sd.get(k), torch.Tensor) or sd[k].shape != want[k].shape]
    if bad or set(sd) - set(want):
        raise ValueError(f"checkpoint {path} does not match its model configuration "
                         f"({bad[0] if bad else sorted(set(sd) - set(want))[0]})")
    model.load_state_dict(sd)
    return model


# ---- a run's stages

STAGE = re.compile(r"sft|dpo|selm_[1-9][0-9]*")  # the names of train.py's stages


def stage_names(iterations):
    """The stages of a run, in order; each leaves <stage>.pt in the run's directory."""
    return ["sft", "dpo"] + [f"selm_{t}" for t in range(1, iterations + 1)]


def stage_path(out_dir, stage):
    return os.path.join(out_dir, f"{stage}.pt")


def disk_usage(path):
    """Bytes of every file under `path`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def human_size(n):
    """1536 -> "1.5 KB": bytes in the unit that keeps the number below 1000 (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def stage_state(stage, model_config, weights, results, **extra):
    """What a stage's checkpoint holds: the weights (plain tensors, as runtime.Runtime.state_dict
    gathers them), the results so far, and `extra` as it is (the run's config, the SFT answers,
    the metrics log's size, ...). No optimizer state: every stage starts a fresh optimizer, and
    --resume trains an interrupted stage again from its start, so AdamW's two moments (twice
    the weights' size) would never be read again."""
    return {"model": weights, "model_config": asdict(model_config), "stage": stage, "results": results,
            "rng": torch.get_rng_state(), **extra}


def commit(out_dir, state, is_main=True):
    """Write a stage's checkpoint atomically, and only then results.json, which --resume
    rewrites from the checkpoint anyway. A stage is committed twice: once its training is done
    (state["evaluated"] False), so that a failure while it is evaluated -- a judge that calls
    a remote service, say -- loses no training; and again with its evaluation."""
    if is_main:
        atomic_save(state, stage_path(out_dir, state["stage"]))
        write_json_atomic(state["results"], os.path.join(out_dir, "results.json"))


def weights_digest(model):
    """A short fingerprint of the weights: which model a cache of its outputs came from (the
    instruction task's offline pairs)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
