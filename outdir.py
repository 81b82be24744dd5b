"""
outdir.py -- a run's --out-dir: one run at a time, and nothing in it touched that the run did not write.

The out-dir is the user's. A run claims it (claim_out_dir: a lock that names the process
holding it, which the kernel releases however the process ends), surveys it before changing
anything (survey: what --resume continues from, checked whole; a fresh run refuses another
run's stages), and only then writes (begin): the temporary folders its own killed processes
left are swept (never anything of another name, never through a link), the stages of
--start-from copied in, the metrics log cut back to what the checkpoint saw. A run that stops
says what of it is on disk and what continues it (resume_advice, judge_failure).
"""

import json
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import asdict
from typing import NamedTuple

from checkpoint import (RUN_FIELDS, STAGE, atomic_save, check_fields, load_checkpoint, model_from_checkpoint,
                        stage_names, stage_path)
from data import JudgeError
from files import TMP_PREFIX, write_json_atomic

try:
    import fcntl
except ImportError:  # Windows: runs are not locked (RunLock)
    fcntl = None

LOCK_FILE = ".selm-lock"


class RunLock:
    """out_dir held by this process: an exclusive flock on out_dir/LOCK_FILE, a file holding
    "<pid> <host>", which names the holder to a run that is refused. The kernel lets go of a
    flock when its process ends, however it ends, so a killed run's file blocks nothing; a run
    that ends removes its file (without fcntl, on Windows, or on a filesystem without flock,
    nothing is locked)."""

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
            except OSError:  # a filesystem without flock (some network or FUSE ones): the run goes unlocked
                os.close(fd)
                return
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
    writes (files.TMP_PREFIX<pid>-*, of a process no longer alive on this machine), in out_dir
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


@contextmanager
def judge_failure(stage, out_dir, saved):
    """A judge that fails (a remote service, say) stops the run with one line that also says
    what of the stage is on disk; saved() tells whether its training was committed."""
    try:
        yield
    except JudgeError as e:
        raise JudgeError(f"{e}; in stage {stage}, " + (
            f"whose training is saved in {stage_path(out_dir, stage)} (--resume evaluates it)"
            if saved() else "of which nothing was saved (--resume runs it again)")) from e


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
    run's stages are never mixed with a new run's. An --export never writes through a link.
    Returns (the checkpoint or None, the completed stages)."""
    links = [n for n in (f"hf-{s}" for s in stages) if config["export"] and os.path.islink(os.path.join(out_dir, n))]
    if links:  # an export writes and deletes files in its folder: it would do so in the folder linked to
        raise ValueError(f"--export: {os.path.join(out_dir, links[0])} is a link; selm exports only into folders "
                         "of its own: remove the link, or give another --out-dir")
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
    """Whether the file at path is a metrics log train.py wrote: empty (begun, no row yet), or
    its first line a row of one."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
        row = json.loads(first) if first else {"stage": None}
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
    ranks.barrier()  # every rank has surveyed out_dir as it was
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
