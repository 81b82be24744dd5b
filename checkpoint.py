"""
checkpoint.py -- what a run leaves on disk, written so that a crash never corrupts it.

Every file goes through `atomic_write`: a temporary file beside it, fsync, then a rename, so
a reader sees the old file or the new one, never half of one, with the permissions the umask
gives; a full disk is one line naming the file (data.WriteError). Checkpoints are
read with weights_only=True: a checkpoint file cannot run code.

A run's directory holds one checkpoint per completed stage (sft.pt, dpo.pt, selm_1.pt, ...),
metrics.jsonl and results.json. The functions at the end find where a killed run stopped
(--resume) and copy another run's finished stages into a new run (--start-from).
"""

import hashlib
import json
import math
import os
import re
import shutil
import socket
from contextlib import contextmanager
from typing import NamedTuple
from dataclasses import asdict, fields

import torch

try:
    import fcntl
except ImportError:  # Windows: runs are not locked (RunLock)
    fcntl = None

from data import TMP_PREFIX, atomic_write_path, file_problem
from model import GPT, GPTConfig


def atomic_write(path, write, binary=True):
    """Call write(file) on a temporary file in the same directory, fsync, then rename: a
    crash leaves either the old file or the new one, never half of one."""
    atomic_write_path(path, lambda tmp: _write_file(tmp, write, "wb" if binary else "w"))


def _write_file(path, write, mode):
    with open(path, mode) as f:
        write(f)


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
    if ckpt.get("metrics_size", 0) < 0 or not all(isinstance(r, dict) for r in ckpt.get("results", [])) \
            or not all(isinstance(a, str) for a in ckpt.get("sft_answers") or []):
        raise ValueError(f"checkpoint {path}: its metrics_size, results or sft_answers are not what train.py writes")
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


def write_json_atomic(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), binary=False)


# ---- a run's directory: one run at a time, and nothing in it touched that the run did not write

STAGE = re.compile(r"sft|dpo|selm_[1-9][0-9]*")  # the names of train.py's stages
LOCK_FILE = ".selm-lock"


def stage_names(iterations):
    """The stages of a run, in order; each leaves <stage>.pt in the run's directory."""
    return ["sft", "dpo"] + [f"selm_{t}" for t in range(1, iterations + 1)]


def stage_path(out_dir, stage):
    return os.path.join(out_dir, f"{stage}.pt")


class RunLock:
    """out_dir held by this process: an exclusive flock on out_dir/LOCK_FILE, a file holding
    "<pid> <host>", which names the holder to a run that is refused. The kernel lets go of a
    flock when its process ends, however it ends, so a killed run's file blocks nothing; a run
    that ends removes its file (without fcntl, on Windows, nothing is locked)."""

    def __init__(self, out_dir):
        self.path, self.fd = os.path.join(out_dir, LOCK_FILE), None
        if fcntl is None:
            return
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise ValueError(f"--out-dir {out_dir} is not writable ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 300).decode(errors="replace").split()
                os.close(fd)
                who = f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "a process starting up"
                raise ValueError(f"--out-dir {out_dir} is in use by another run ({who}); one run at a time") from None
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                self.fd = fd
            else:  # the file of a run that has just ended, which removed it: lock the one there now
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def release(self):
        if self.fd is not None:
            os.unlink(self.path)  # while it is held: nobody else has this file locked
            os.close(self.fd)
            self.fd = None


@contextmanager
def claim_out_dir(out_dir, ranks, create=True):
    """Hold out_dir for this run while the block runs: rank 0 makes it (unless create is False:
    --resume continues a run that is there) and locks it (RunLock); every rank raises if that
    failed (ranks: runtime.Ranks). Only what this run made goes away at the end: its lock file,
    and the folder itself if it made it and a failure left it empty."""
    made, lock, problem = False, None, None
    if ranks.main:
        try:
            if create and not os.path.isdir(out_dir):
                os.makedirs(out_dir)
                made = True
            lock = RunLock(out_dir) if os.path.isdir(out_dir) else None
        except OSError as e:
            problem = f"--out-dir {out_dir} is not writable ({e.strerror})"
        except ValueError as e:
            problem = str(e)
    problem = next((p for p in ranks.gather([problem]) if p), None)
    try:
        if problem:
            raise ValueError(problem)
        yield
    except BaseException:
        if lock is not None:
            lock.release()
        if made and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    if lock is not None:
        lock.release()


def sweep(out_dir):
    """Remove what a killed selm process left half-written: the temporary folders of its atomic
    writes (data.TMP_PREFIX<pid>-*, of a process no longer alive on this machine), in out_dir
    and in its export folders hf-<stage>/. Nothing of another name, no link and nothing behind
    one: everything else in the out-dir is the user's."""
    def real_dir(path):
        return not os.path.islink(path) and os.path.isdir(path)
    exports = [os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.startswith("hf-") and STAGE.fullmatch(n[3:])]
    for folder in [out_dir] + [d for d in exports if real_dir(d)]:
        for name in os.listdir(folder):
            pid = name[len(TMP_PREFIX):].split("-")[0]
            if name.startswith(TMP_PREFIX) and pid.isdigit() and 0 < int(pid) <= 1 << 22 and not alive(int(pid)) \
                    and real_dir(os.path.join(folder, name)):
                shutil.rmtree(os.path.join(folder, name))


def alive(pid):
    """Whether a process of this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def another_run(out_dir):
    """What of a run out_dir holds, in stage order: its stage checkpoints, its export folders
    hf-<stage>/ (not links: a link is the user's), its results.json."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    order = lambda n: (0, 0) if n == "sft" else (0, 1) if n == "dpo" else (int(n[5:]) + 1, 0)  # noqa: E731
    ckpts = sorted((n for n in names if n.endswith(".pt") and STAGE.fullmatch(n[:-3])), key=lambda n: order(n[:-3]))
    exports = sorted((n for n in names if n.startswith("hf-") and STAGE.fullmatch(n[3:])
                      and not os.path.islink(os.path.join(out_dir, n))), key=lambda n: order(n[3:]))
    return ckpts + exports + [n for n in names if n == "results.json"]


# Settings that never change what a run computes; a resumed run may differ in them. The
# output directory is the one being resumed, however it is spelled now (relative, through a
# link, or moved).
IGNORED_ON_RESUME = ("resume", "device", "start_from", "compile", "export", "fsdp", "activation_checkpointing",
                     "out_dir")


def last_checkpoint(out_dir, stages, config):
    """--resume: the checkpoint of the last completed stage in out_dir, and the list of
    completed stages. `config` (a dict) must equal the one the checkpoint was made with, up
    to IGNORED_ON_RESUME."""
    done = [s for s in stages if os.path.isfile(stage_path(out_dir, s))]
    if not done:
        lone_log = os.path.isfile(os.path.join(out_dir, "metrics.jsonl"))
        raise ValueError(f"--resume: no checkpoint in {out_dir}" + (
            ": no stage was saved by the run whose metrics.jsonl is there; start it again without --resume"
            if lone_log else ""))
    path = stage_path(out_dir, done[-1])
    ckpt = check_fields(load_checkpoint(path, mmap=True), path, RUN_FIELDS)
    diff = [k for k, v in config.items() if k not in IGNORED_ON_RESUME and ckpt["config"].get(k) != v]
    if diff:
        raise ValueError(f"--resume: configuration differs from the checkpoint's in {', '.join(diff)}")
    return ckpt, done


def resume_advice(out_dir, config):
    """What to do after an interruption: --resume where this run (config) saved a stage, else
    the same command again."""
    try:
        _, done = last_checkpoint(out_dir, stage_names(config["iterations"] or 0), config)
    except (ValueError, OSError):
        return f"no stage was saved in {out_dir}: run the same command again"
    return f"`--resume` continues after stage {done[-1]} in {out_dir}"


# The settings that decide what the SFT and offline DPO stages produce: a run may start from
# another run's stage checkpoint only if these agree (see check_start).
SHARED_BY_STAGE = {
    "sft": ("model", "init_from", "sft", "prefs", "prompts", "judge", "bpe_path", "block_size",
            "dropout", "task_seed", "min_len", "max_len", "n_sft", "n_eval",
            "sft_steps", "sft_lr", "sft_batch_size", "seed", "max_new_tokens", "kl_samples", "sft_passes"),
    "dpo": ("chunk_size", "beta", "loss_type", "lr", "batch_size", "micro_batch_size", "warmup",
            "weight_decay", "grad_clip", "offline_passes"),
}
# ... and what the online stages depend on besides
ONLINE = ("alpha", "lr_decay", "y_ref", "temperature", "online_samples", "optimism_samples", "tie_order")


class Start(NamedTuple):
    """--start-from, checked: the checkpoint given, the stages it completes, and its contents."""
    path: str
    done: list
    ckpt: dict


def check_start(start_from, stages, config, model_config):
    """--start-from, read and checked (nothing is written): its checkpoint and those of the
    stages before it, beside it, are this run's stages if the settings that made them
    (SHARED_BY_STAGE, ONLINE) are this run's and their model is this run's. Runs of one seed in
    a sweep share SFT and offline DPO this way."""
    src = check_fields(load_checkpoint(start_from), start_from, RUN_FIELDS)
    last = src["stage"]
    if last not in stages:
        raise ValueError(f"--start-from: stage {last!r} is not one of this run's stages {stages}")
    done = stages[:stages.index(last) + 1]
    keys = [k for s in done[:2] for k in SHARED_BY_STAGE[s]] + (list(ONLINE) if len(done) > 2 else [])
    diff = [k for k in keys if src["config"].get(k) != config[k]]
    if diff:
        raise ValueError(f"--start-from: {start_from} was made with different {', '.join(diff)}")
    for s in done:
        path = os.path.join(os.path.dirname(os.path.abspath(start_from)), f"{s}.pt")
        ck = src if s == last else check_fields(load_checkpoint(path, mmap=True), path, RUN_FIELDS)
        if ck["stage"] != s or ck["model_config"] != asdict(model_config):
            raise ValueError(f"--start-from: {path} is not stage {s} of this run's model")
    return Start(start_from, done, src)


def survey(out_dir, stages, config, model_config, start=None):
    """What the run continues from, checked before anything in out_dir is changed: with
    --resume, its last stage (last_checkpoint), which must hold this run's model, its sft.pt
    and the metrics log as that checkpoint left it (check_log); with --start-from, the stages
    adopted (check_start's); else nothing, and out_dir must hold no other run (another_run): a
    run's stages are never mixed with a new run's. Returns (the checkpoint or None, the
    completed stages)."""
    if config["resume"]:
        ckpt, done = last_checkpoint(out_dir, stages, config)
        for path, ck in ((stage_path(out_dir, done[-1]), ckpt), (stage_path(out_dir, "sft"), None)):
            ck = ck or load_checkpoint(path, mmap=True)
            if ck["model_config"] != asdict(model_config):
                raise ValueError(f"checkpoint {path} holds a different model ({ck['model_config']}) "
                                 f"than this run's ({asdict(model_config)})")
        check_log(os.path.join(out_dir, "metrics.jsonl"), ckpt.get("metrics_size", 0), stage_path(out_dir, done[-1]))
        return ckpt, done
    found = another_run(out_dir)
    if found:
        raise ValueError(f"--out-dir {out_dir} holds another run ({', '.join(found)}): continue it with --resume, "
                         "give another --out-dir, or remove those files")
    log = os.path.join(out_dir, "metrics.jsonl")
    if os.path.lexists(log) and not selm_log(log):  # a run that saved no stage left its log: it starts again
        raise ValueError(f"--out-dir {out_dir} holds a metrics.jsonl that is no log of selm's: move it, or give "
                         "another --out-dir")
    if start is None:
        return None, []
    return {**start.ckpt, "config": dict(config), "metrics_size": 0}, start.done


def check_log(path, size, ckpt_path):
    """The metrics log must hold the `size` bytes the checkpoint at ckpt_path recorded, whole
    lines, no NUL: --resume cuts it back to them. A log that is gone starts again."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        head = f.read(size)
    if len(head) < size:
        raise ValueError(f"{path} is {len(head)} bytes, shorter than the {size} that {ckpt_path} recorded: it was "
                         "cut or replaced; put the whole log back, or remove it to continue with a new one")
    if b"\0" in head or size and not head.endswith(b"\n"):
        raise ValueError(f"{path} is damaged in its first {size} bytes, which {ckpt_path} recorded: put the whole "
                         "log back, or remove it to continue with a new one")


def selm_log(path):
    """Whether the file at path is a metrics log train.py wrote: its first line a row of one."""
    try:
        with open(path, "rb") as f:
            row = json.loads(f.readline(1 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return os.path.isfile(path) and isinstance(row, dict) and bool({"stage", "eval", "offline_pairs"} & set(row))


def begin(out_dir, ckpt, start, log, ranks):
    """The run's first writes, once survey has checked everything (rank 0 writes, the others
    wait): what a killed process left half-written swept away; the stages of --start-from
    copied into out_dir, relabelled with this run's configuration, so that it continues (and
    resumes) as if it had made them; the metrics log cut back to what the checkpoint saw (the
    interrupted stage's lines are dropped; its rerun writes them again), a fresh run's begun
    anew; results.json as the checkpoint has it."""
    if ranks.main:
        sweep(out_dir)
        for s in start.done if start else []:
            src = os.path.join(os.path.dirname(os.path.abspath(start.path)), f"{s}.pt")
            ck = start.ckpt if s == start.done[-1] else load_checkpoint(src, mmap=True)
            atomic_save({**ck, "config": ckpt["config"], "metrics_size": 0}, stage_path(out_dir, s))
        log.truncate(ckpt.get("metrics_size", 0) if ckpt else 0)
        if ckpt is not None:
            write_json_atomic(ckpt["results"], os.path.join(out_dir, "results.json"))
    ranks.barrier()


def restore(ckpt, model, out_dir, device):
    """Continue after a checkpoint (checked by survey): load its weights into `model` and
    rebuild the SFT model (the KL reference of every evaluation). Returns (results so far, the
    SFT model's eval answers, the SFT model, and the checkpoint itself if its stage was trained
    but not evaluated -- the caller's to evaluate -- else None). Without a checkpoint: a fresh start."""
    if ckpt is None:
        return [], None, None, None
    model.load_state_dict(model_from_checkpoint(ckpt).state_dict())
    sft_path = stage_path(out_dir, "sft")
    sft_model = model_from_checkpoint(load_checkpoint(sft_path), sft_path).to(device).eval()
    return ckpt["results"], ckpt["sft_answers"], sft_model, (None if ckpt.get("evaluated", True) else ckpt)


def stage_state(stage, model_config, weights, optimizer_state, results, **extra):
    """What a stage's checkpoint holds: weights and optimizer state (plain tensors, as
    runtime.Runtime.state_dict gathers them), the results so far, and `extra` as it is (the
    run's config, the SFT answers, the metrics log's size, ...)."""
    return {"model": weights, "model_config": asdict(model_config), "stage": stage, "results": results,
            "optimizer": optimizer_state, "rng": torch.get_rng_state(), **extra}


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
