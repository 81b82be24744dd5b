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
import os
import shutil
import tempfile
from dataclasses import asdict, fields

import torch

from data import atomic_write_path
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


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint with weights_only=True (a checkpoint cannot run code). Errors are
    one line naming the file."""
    check_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupted, or not a torch file at all
        raise ValueError(f"checkpoint {path} is unreadable: truncated, corrupted, not a checkpoint, "
                         f"or holding more than tensors ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a selm checkpoint (needs 'model' and 'model_config')")
    return ckpt


def check_checkpoint_path(path):
    """A FileNotFoundError in one line unless `path` is a file: a directory, or nothing."""
    if os.path.isdir(path):
        stages = sorted(f for f in os.listdir(path) if f.endswith(".pt"))
        raise FileNotFoundError(f"checkpoint {path} is a directory; give one of its checkpoint files"
                                + (f" ({', '.join(stages)})" if stages else " (it holds none)"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")


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


def write_json_atomic(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), binary=False)


# ---- a run's directory: stage checkpoints, resume, stages adopted from another run ----------

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


def prepare_out_dir(path):
    """Create the output directory, prove it writable, and sweep away what a killed process
    left half-written: the .tmp-* of atomic writes, in the directory and in its exports
    hf-<stage>/ (and any .tmp* a third-party writer such as safetensors left there)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {path} is not writable ({e.strerror})") from None
    exports = [os.path.join(path, d) for d in os.listdir(path) if d.startswith("hf-")]
    for folder in [path] + [d for d in exports if os.path.isdir(d)]:
        for name in os.listdir(folder):
            junk = os.path.join(folder, name)
            if name.startswith(".tmp") and os.path.isdir(junk):
                shutil.rmtree(junk)
            elif name.startswith(".tmp"):
                os.unlink(junk)


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
        raise ValueError(f"--resume: no checkpoint in {out_dir}")
    ckpt = load_checkpoint(stage_path(out_dir, done[-1]))
    diff = [k for k, v in config.items() if k not in IGNORED_ON_RESUME and ckpt["config"].get(k) != v]
    if diff:
        raise ValueError(f"--resume: configuration differs from the checkpoint's in {', '.join(diff)}")
    return ckpt, done


# The settings that decide what the SFT and offline DPO stages produce: a run may start from
# another run's stage checkpoint only if these agree (see adopt_stages).
SHARED_BY_STAGE = {
    "sft": ("model", "init_from", "sft", "prefs", "prompts", "judge", "bpe_path", "block_size",
            "dropout", "task_seed", "min_len", "max_len", "n_sft", "n_eval",
            "sft_steps", "sft_lr", "sft_batch_size", "seed", "max_new_tokens", "kl_samples", "sft_passes"),
    "dpo": ("chunk_size", "beta", "loss_type", "lr", "batch_size", "micro_batch_size", "warmup",
            "weight_decay", "grad_clip", "offline_passes"),
}
# ... and what the online stages depend on besides
ONLINE = ("alpha", "lr_decay", "y_ref", "temperature", "online_samples", "optimism_samples", "tie_order")


def adopt_stages(start_from, out_dir, stages, config):
    """--start-from: copy the completed stages' checkpoints of another run into out_dir,
    relabelled with this run's configuration (a dict), so that this run continues (and
    resumes) as if it had made them. Runs of one seed in a sweep share SFT and offline DPO
    this way."""
    src = load_checkpoint(start_from)
    last = src["stage"]
    if last not in stages:
        raise ValueError(f"--start-from: stage {last!r} is not one of this run's stages {stages}")
    done = stages[:stages.index(last) + 1]
    keys = [k for s in done[:2] for k in SHARED_BY_STAGE[s]] + (list(ONLINE) if len(done) > 2 else [])
    diff = [k for k in keys if src["config"].get(k) != config[k]]
    if diff:
        raise ValueError(f"--start-from: {start_from} was made with different {', '.join(diff)}")
    d = os.path.dirname(os.path.abspath(start_from))
    for s in done:
        ck = src if s == last else load_checkpoint(os.path.join(d, f"{s}.pt"))
        ck["config"], ck["metrics_size"] = dict(config), 0  # the other run's log stays there
        atomic_save(ck, stage_path(out_dir, s))
    for s in stages[len(done):]:  # whatever a former run left in out_dir is not ours
        if os.path.exists(stage_path(out_dir, s)):
            os.unlink(stage_path(out_dir, s))
    write_json_atomic(src["results"], os.path.join(out_dir, "results.json"))


def open_run(out_dir, stages, config, is_main=True, barrier=lambda: None):
    """Make out_dir ready (rank 0 alone writes), adopt another run's stages for
    --start-from, and find where to continue. config: the run's settings as a dict.
    Returns (the last completed stage's checkpoint or None, the completed stages)."""
    if is_main:
        prepare_out_dir(out_dir)
        if config["start_from"]:
            adopt_stages(config["start_from"], out_dir, stages, config)
    barrier()
    if config["resume"] or config["start_from"]:
        return last_checkpoint(out_dir, stages, config)
    return None, []


def restore(ckpt, model, out_dir, device, log, is_main=True):
    """Continue after a checkpoint: load its weights into `model`, rebuild the SFT model (the
    KL reference of every evaluation), cut the metrics log back to what the checkpoint saw
    (the interrupted stage's lines are dropped; its rerun writes them again) and rewrite
    results.json from it. Returns (results so far, the SFT model's eval answers, the SFT
    model, and the checkpoint itself if its stage was trained but not evaluated -- the
    caller's to evaluate -- else None). Without a checkpoint: a fresh start."""
    if ckpt is None:
        return [], None, None, None
    if ckpt["model_config"] != asdict(model.config):
        raise ValueError(f"checkpoint in {out_dir} holds a different model ({ckpt['model_config']}) "
                         f"than this run's ({asdict(model.config)})")
    model.load_state_dict(model_from_checkpoint(ckpt).state_dict())
    sft_path = stage_path(out_dir, "sft")
    sft_model = model_from_checkpoint(load_checkpoint(sft_path), sft_path).to(device).eval()
    log.truncate(ckpt.get("metrics_size", log.size()))
    if is_main:
        write_json_atomic(ckpt["results"], os.path.join(out_dir, "results.json"))
    return ckpt["results"], ckpt["sft_answers"], sft_model, (None if ckpt.get("evaluated", True) else ckpt)


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
