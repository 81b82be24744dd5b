"""
train.py -- the whole SELM pipeline, one command:

    python train.py --model small

  stage "sft":     supervised fine-tuning of a fresh model on mediocre demonstrations
  stage "dpo":     offline DPO on chunk 1's fixed pairs, reference = the SFT model
                   (the paper's Zephyr-DPO row; SELM.md: "iteration 0 is plain DPO")
  stage "selm_t":  for t = 1..T, with reference pi_{t-1} = the previous stage's model:
                   greedy y_ref ~ pi_{t-1} on chunk t+1's prompts, the judge ranks
                   {chosen, rejected, y_ref}, best and worst become the new pair, one epoch
                   of the SELM loss (selm.selm_loss), then the reference moves on.
After every stage the model is evaluated on held-out prompts (greedy decoding) and a
checkpoint is written. `--alpha 0` is iterative online DPO; `--iterations 0` stops after
offline DPO.

Written to --out-dir: <stage>.pt checkpoints, metrics.jsonl (one JSON object per logged
step and per evaluation) and results.json (one row per stage).
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import data
from model import GPT, atomic_save, load_checkpoint, model_from_checkpoint, preset
from sample import generate
from selm import (dpo_loss, online_pairs, optimism_term, preference_metrics, reference_logps,
                  selm_loss, sequence_logps)


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model
    model: str = opt("small", "model preset: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    init_from: str = opt(None, "start from a Hugging Face GPT-2 directory on disk instead of a fresh model")
    dropout: float = opt(0.0, "dropout in every block")
    # the built-in task
    task_seed: int = opt(0, "seed of the built-in task's data (kept fixed across training seeds)")
    min_len: int = opt(7, "shortest word to sort")
    max_len: int = opt(10, "longest word to sort")
    n_sft: int = opt(None, "SFT demonstrations (default: per preset, see SCALE)")
    chunk_size: int = opt(None, "prompts per chunk; offline DPO uses chunk 1, SELM iteration t chunk t+1 (default: per preset)")
    n_eval: int = opt(None, "held-out evaluation prompts (default: per preset)")
    # SFT
    sft_steps: int = opt(None, "SFT optimizer steps (default: per preset)")
    sft_lr: float = opt(2e-3, "SFT peak learning rate")
    sft_batch_size: int = opt(64, "SFT batch size")
    # DPO and SELM
    iterations: int = opt(3, "SELM iterations after offline DPO (0 = stop after offline DPO)")
    alpha: float = opt(0.001, "SELM optimism coefficient (0 = iterative DPO)")
    beta: float = opt(2.0, "DPO/SELM inverse temperature (tuned for the built-in task, see README)")
    loss_type: str = opt("sigmoid", "preference loss: sigmoid (DPO) or ipo")
    lr: float = opt(1e-4, "peak learning rate of offline DPO and of SELM iteration 1")
    lr_decay: float = opt(1.0, "each SELM iteration's learning rate is the previous one's times this")
    batch_size: int = opt(32, "preference pairs per optimizer step")
    micro_batch_size: int = opt(32, "pairs per forward pass (gradient accumulation when smaller)")
    warmup: float = opt(0.1, "fraction of each stage's steps spent warming the learning rate up")
    weight_decay: float = opt(0.0, "AdamW weight decay for DPO/SELM")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    # sampling and evaluation
    max_new_tokens: int = opt(None, "response length cap (default: longest word + 4)")
    gen_batch_size: int = opt(256, "prompts per call of the sampler")
    kl_samples: int = opt(1, "temperature-1 samples per eval prompt for the KL(pi || pi_SFT) estimate")
    # run
    seed: int = opt(0, "training seed (initialisation, batch order, sampling)")
    device: str = opt("auto", "auto picks cuda, then mps, then cpu")
    dtype: str = opt("auto", "float32, bfloat16 or float16 autocast (auto: bf16 on GPUs that have it, else fp32)")
    out_dir: str = opt("out", "where checkpoints, metrics.jsonl and results.json go")
    resume: bool = opt(False, "continue from the last completed stage in --out-dir")
    start_from: str = opt(None, "skip the stages up to and including the one saved in this checkpoint of another run "
                                "(same model, task, SFT and seed); they are copied into --out-dir")
    log_every: int = opt(10, "write a metrics line every this many steps")


# Data and step counts that fit each preset's time budget on a 2-core CPU (`tiny`: about a
# minute, the rest: about ten). Flags override them.
SCALE = {
    "tiny": dict(n_sft=4096, chunk_size=512, n_eval=256, sft_steps=800),
    "default": dict(n_sft=8192, chunk_size=1024, n_eval=512, sft_steps=1500),
}


def resolve(cfg):
    """Fill the per-preset defaults (fields left at None)."""
    for k, v in SCALE.get(cfg.model, SCALE["default"]).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = cfg.max_len + 4
    return cfg


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            ap.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            ap.add_argument(flag, type=f.type, default=f.default, help=f.metadata["help"])
    return Config(**vars(ap.parse_args(argv)))


def check_config(cfg):
    """Impossible settings fail here, in one line, before anything is written."""
    resolve(cfg)
    if cfg.beta <= 0:
        raise ValueError(f"--beta must be positive, got {cfg.beta}")
    if cfg.alpha < 0:
        raise ValueError(f"--alpha must be non-negative, got {cfg.alpha}")
    if cfg.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {cfg.iterations}")
    if cfg.loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"--loss-type must be sigmoid or ipo, got {cfg.loss_type!r}")
    if cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size {cfg.micro_batch_size}")
    for name in ("sft_steps", "sft_batch_size", "batch_size", "micro_batch_size", "chunk_size", "n_eval", "gen_batch_size"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    preset(cfg.model)  # unknown preset -> clear error


# ---- devices, files, logging ------------------------------------------------------------

def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device, dtype):
    """bf16 autocast on GPUs that support it (fp16 otherwise); fp32 on CPU by default.
    Log-softmax stays fp32 either way (selm.sequence_logps)."""
    if dtype == "auto":
        dtype = "float32" if device.type != "cuda" else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def write_json_atomic(obj, path):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl, one object per line, appended and flushed line by line."""

    def __init__(self, path):
        self.path = path

    def write(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def lr_at(step, total, peak, warmup):
    """Linear warmup over the first `warmup` fraction of steps, then cosine to zero."""
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


# ---- stage 1: SFT ----------------------------------------------------------------------

def train_sft(cfg, model, examples, pad_id, device, amp, log):
    """Cross-entropy on response tokens only (the prompt is given, not learned)."""
    opt_ = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.sft_steps), desc="sft", leave=False, mininterval=1.0)
    for step in bar:
        idx = torch.randint(len(examples), (cfg.sft_batch_size,), generator=g).tolist()
        b = {k: v.to(device) for k, v in data.collate([examples[i] for i in idx], pad_id).items()}
        target_mask = b["response_mask"][:, 1:]  # token t is predicted at position t-1
        with amp:
            logits = model(b["input_ids"][:, :-1], output_mask=target_mask)  # (N, V)
        loss = torch.nn.functional.cross_entropy(logits.float(), b["input_ids"][:, 1:][target_mask])
        check_finite(loss, "sft", step)
        for group in opt_.param_groups:
            group["lr"] = lr_at(step, cfg.sft_steps, cfg.sft_lr, 0.05)
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt_.step()
        if step % cfg.log_every == 0 or step == cfg.sft_steps - 1:
            log.write({"stage": "sft", "step": step, "loss": loss.item(), "lr": opt_.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return opt_


def check_finite(loss, stage, step):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) in stage {stage} at step {step}; "
                                 "lower the learning rate (the last good checkpoint is intact)")


# ---- stages 2..: DPO and SELM on a list of preference examples --------------------------

def logps_of(model, rows, pad_id, batch_size):
    """Summed response log-probs of (prompt_ids, response_ids) rows under `model`, computed
    without grad in eval mode (selm.reference_logps): (N,) on the model's device."""
    batches = (data.collate(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size))
    return reference_logps(model, batches)


def train_preferences(cfg, stage, policy, examples, lr, alpha, pad_id, device, amp, log, seed):
    """One epoch of the SELM loss (DPO when alpha == 0 or there is no y_ref).

    examples: list of (prompt_ids, chosen_ids, rejected_ids, y_ref_ids or None).
    The reference is the policy as it enters the stage (the SFT model for offline DPO,
    pi_{t-1} for SELM iteration t), so its log-probs are computed here, once, before the
    first update, under no_grad: no second model in memory, nothing recomputed per step.
    """
    with_ref = examples[0][3] is not None
    parts = [1, 2, 3] if with_ref else [1, 2]
    rows = [(ex[0], ex[k]) for k in parts for ex in examples]  # all chosen, all rejected, (all y_ref)
    with amp:
        ref_logps = logps_of(policy, rows, pad_id, 4 * cfg.micro_batch_size)
    ref_logps = ref_logps.view(len(parts), len(examples))  # (2 or 3, N)

    opt_ = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    order = list(data.batches(len(examples), cfg.batch_size, seed=seed, shuffle=True))
    accum = cfg.batch_size // cfg.micro_batch_size
    policy.train()
    bar = tqdm(order, desc=stage, leave=False, mininterval=1.0)
    for step, idx in enumerate(bar):
        for group in opt_.param_groups:
            group["lr"] = lr_at(step, len(order), lr, cfg.warmup)
        opt_.zero_grad(set_to_none=True)
        stats = []
        for m in range(0, len(idx), cfg.micro_batch_size):
            mi = idx[m:m + cfg.micro_batch_size]
            b = data.collate_preferences([examples[i][0] for i in mi], [examples[i][1] for i in mi],
                                         [examples[i][2] for i in mi],
                                         [examples[i][3] for i in mi] if with_ref else None, pad_id=pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            with amp:
                logps = sequence_logps(policy, b["input_ids"], b["response_mask"])  # (parts*B,)
            pol = logps.view(len(parts), len(mi))
            ref = ref_logps[:, mi]
            if with_ref:  # SELM, Eq. 4.2
                losses, cr, rr = selm_loss(pol[0], pol[1], ref[0], ref[1], pol[2], ref[2],
                                           beta=cfg.beta, alpha=alpha, loss_type=cfg.loss_type)
                optimism = optimism_term(pol[2], ref[2], beta=cfg.beta, alpha=alpha).detach()
            else:  # offline DPO: no reference response, no optimism term
                losses, cr, rr = dpo_loss(pol[0], pol[1], ref[0], ref[1], beta=cfg.beta,
                                          loss_type=cfg.loss_type)
                optimism = torch.zeros_like(cr)
            # sum over the micro-batch / global batch: the same gradient whatever `accum` is
            loss = losses.sum() / len(idx)
            check_finite(loss, stage, step)
            loss.backward()
            stats.append((losses.detach(), cr, rr, pol[0].detach(), pol[1].detach(), optimism))
        if cfg.grad_clip:
            gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            if not torch.isfinite(gn):
                raise FloatingPointError(f"non-finite gradient in stage {stage} at step {step}")
        opt_.step()
        if step % cfg.log_every == 0 or step == len(order) - 1:
            cat = [torch.cat(s) for s in zip(*stats)]
            row = preference_metrics(cat[0], cat[1], cat[2], policy_chosen_logps=cat[3],
                                     policy_rejected_logps=cat[4], optimism=cat[5])
            log.write({"stage": stage, "step": step, "lr": opt_.param_groups[0]["lr"], **row})
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
    return opt_


def greedy_responses(cfg, model, prompt_ids, tok, device):
    """Greedy responses (token lists without EOS, and texts) for a list of prompts."""
    out = []
    for i in range(0, len(prompt_ids), cfg.gen_batch_size):
        r, _ = generate(model, prompt_ids[i:i + cfg.gen_batch_size], cfg.max_new_tokens,
                        temperature=0, eos_id=tok.eos_id, pad_id=tok.pad_id)
        out += r
    ids = [[t for t in r if t != tok.eos_id] for r in out]
    return ids, [tok.decode(r) for r in ids]


def selm_iteration(cfg, stage, t, policy, chunk, tok, judge, device, amp, log):
    """One online iteration (SELM.md, Algorithm 1): sample, judge, build pairs, train."""
    # pi_ref = pi_{t-1} is the policy as it enters this iteration: sample from it now,
    # score with it in train_preferences before the first update, and the reference moves.
    prompts = [ex["prompt"] for ex in chunk]
    prompt_ids = [tok.encode(p) for p in prompts]
    t0 = time.time()
    y_ref_ids, y_ref = greedy_responses(cfg, policy, prompt_ids, tok, device)
    t_sample = time.time() - t0
    t0 = time.time()
    pairs = online_pairs(judge, prompts, [ex["chosen"] for ex in chunk],
                         [ex["rejected"] for ex in chunk], y_ref)
    t_judge = time.time() - t0
    examples, n_ref_best, n_tied = [], 0, 0
    for p_ids, pair, yr in zip(prompt_ids, pairs, y_ref_ids):
        if pair is None:  # all three candidates scored the same: no preference to learn
            n_tied += 1
            continue
        chosen, rejected = pair
        n_ref_best += chosen == tok.decode(yr)
        c = tok.encode(chosen) + [tok.eos_id]
        r = tok.encode(rejected) + [tok.eos_id]
        examples.append((p_ids, c, r, yr + [tok.eos_id]))
    lr = cfg.lr * cfg.lr_decay ** (t - 1)
    t0 = time.time()
    opt_ = train_preferences(cfg, stage, policy, examples, lr, cfg.alpha, tok.pad_id, device, amp,
                             log, seed=cfg.seed * 1000 + t + 1)
    info = {"pairs": len(examples), "dropped_ties": n_tied, "y_ref_chosen": n_ref_best / max(1, len(examples)),
            "t_sample": t_sample, "t_judge": t_judge, "t_train": time.time() - t0}
    log.write({"stage": stage, "online": info})
    return opt_, info


# ---- evaluation ------------------------------------------------------------------------

@torch.no_grad()
def evaluate(cfg, stage, model, sft_model, eval_set, sft_answers, tok, judge, device, amp):
    """Greedy answers on held-out prompts, judged against the fixed reference answers and
    against the SFT model's answers (ties count half), plus KL(pi || pi_SFT) estimated as
    the mean of log pi(y) - log pi_SFT(y) over temperature-1 samples y ~ pi."""
    prompts = [e["prompt"] for e in eval_set]
    prompt_ids = [tok.encode(p) for p in prompts]
    ids, answers = greedy_responses(cfg, model, prompt_ids, tok, device)
    sft_answers = answers if sft_answers is None else sft_answers
    win_ref = win_sft = reward = perfect = 0.0
    for p, a, e, s in zip(prompts, answers, eval_set, sft_answers):
        sa, sr, ss = data.call_judge(judge, p, [a, e["reference"], s])
        win_ref += 1.0 if sa > sr else 0.5 if sa == sr else 0.0
        win_sft += 1.0 if sa > ss else 0.5 if sa == ss else 0.0
        reward += sa
        perfect += sa >= 1.0
    n = len(prompts)
    kl = 0.0
    if sft_model is not model and cfg.kl_samples > 0:
        rows = []
        for k in range(cfg.kl_samples):
            for i in range(0, n, cfg.gen_batch_size):
                r, _ = generate(model, prompt_ids[i:i + cfg.gen_batch_size], cfg.max_new_tokens,
                                temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                seed=cfg.seed * 7919 + 31 * k + i)
                rows += [(p, y) for p, y in zip(prompt_ids[i:i + cfg.gen_batch_size], r) if y]
        with amp:
            lp = logps_of(model, rows, tok.pad_id, 4 * cfg.micro_batch_size)
            lq = logps_of(sft_model, rows, tok.pad_id, 4 * cfg.micro_batch_size)
        kl = (lp - lq).mean().item()
    row = {"stage": stage, "win_rate_vs_reference": win_ref / n, "win_rate_vs_sft": win_sft / n,
           "reward": reward / n, "perfect": perfect / n,
           "length": sum(len(i) for i in ids) / n, "kl": kl}
    return row, answers


# ---- the pipeline ----------------------------------------------------------------------

def stage_names(cfg):
    return ["sft", "dpo"] + [f"selm_{t}" for t in range(1, cfg.iterations + 1)]


def prepare_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {path} is not writable ({e.strerror})") from None


# The fields that decide what the SFT and offline DPO stages produce: a run may start from
# another run's stage checkpoint only if these agree (see --start-from).
SHARED_BY_STAGE = {
    "sft": ("model", "init_from", "dropout", "task_seed", "min_len", "max_len", "n_sft", "n_eval",
            "sft_steps", "sft_lr", "sft_batch_size", "seed", "max_new_tokens", "kl_samples"),
    "dpo": ("chunk_size", "beta", "loss_type", "lr", "batch_size", "micro_batch_size", "warmup",
            "weight_decay", "grad_clip"),
}


def adopt_stages(cfg, stages):
    """--start-from: copy the completed stages' checkpoints of another run into out_dir,
    relabelled with this run's configuration, so that this run continues (and resumes)
    as if it had made them. Runs of one seed in a sweep share SFT and offline DPO this way."""
    src = load_checkpoint(cfg.start_from)
    last = src["stage"]
    if last not in stages:
        raise ValueError(f"--start-from: stage {last!r} is not one of this run's stages {stages}")
    done = stages[:stages.index(last) + 1]
    keys = [k for s in done[:2] for k in SHARED_BY_STAGE[s]] + (["alpha", "lr_decay"] if len(done) > 2 else [])
    diff = [k for k in keys if src["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"--start-from: {cfg.start_from} was made with different {', '.join(diff)}")
    d = os.path.dirname(os.path.abspath(cfg.start_from))
    for s in done:
        ck = src if s == last else load_checkpoint(os.path.join(d, f"{s}.pt"))
        ck["config"] = asdict(cfg)
        atomic_save(ck, os.path.join(cfg.out_dir, f"{s}.pt"))
    write_json_atomic(src["results"], os.path.join(cfg.out_dir, "results.json"))
    return done, src


def run(cfg):
    check_config(cfg)
    device = pick_device(cfg.device)
    amp = autocast_for(device, cfg.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    prepare_out_dir(cfg.out_dir)
    stages = stage_names(cfg)
    done = []  # stages already completed (on --resume)
    ckpt = None
    if cfg.resume:
        done = [s for s in stages if os.path.isfile(os.path.join(cfg.out_dir, f"{s}.pt"))]
        if not done:
            raise ValueError(f"--resume: no checkpoint in {cfg.out_dir}")
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, f"{done[-1]}.pt"))
        skip = ("resume", "device", "start_from")
        saved = {k: v for k, v in ckpt["config"].items() if k not in skip}
        now = {k: v for k, v in asdict(cfg).items() if k not in skip}
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            raise ValueError(f"--resume: configuration differs from the checkpoint's in {', '.join(diff)}")
    if cfg.start_from:
        if cfg.resume:
            raise ValueError("--start-from and --resume exclude each other")
        done, ckpt = adopt_stages(cfg, stages)
    print("config:", json.dumps(asdict(cfg)))

    tok = data.get_tokenizer()
    task = data.make_task(seed=cfg.task_seed, n_sft=cfg.n_sft, n_prompts_per_chunk=cfg.chunk_size,
                          n_chunks=cfg.iterations + 1, n_eval=cfg.n_eval,
                          min_len=cfg.min_len, max_len=cfg.max_len)
    judge = data.judge
    mcfg = preset(cfg.model, vocab_size=tok.vocab_size, dropout=cfg.dropout)
    max_seq = max(len(tok.encode(p)) for p, _ in task.sft) + cfg.max_new_tokens + 1
    if max_seq > mcfg.block_size:
        raise ValueError(f"the task needs {max_seq} tokens of context, model {cfg.model} has {mcfg.block_size}")
    sft_examples = [data.encode_pair(tok, p, r, mcfg.block_size) for p, r in task.sft]

    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"))
    results, sft_answers, sft_model = [], None, None
    if ckpt is not None:
        model.load_state_dict(model_from_checkpoint(ckpt).state_dict())
        results, sft_answers = ckpt["results"], ckpt["sft_answers"]
        sft_model = model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, "sft.pt"))).to(device).eval()
        print(f"continuing after stage {done[-1]}")
    print(f"model: {cfg.model}, {model.num_params() / 1e6:.2f}M parameters, device {device}")

    timings = {}
    for si, stage in enumerate(stages):
        if stage in done:
            continue
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1000 + si)  # each stage's randomness independent of resume
        info = {}
        if stage == "sft":
            opt_ = train_sft(cfg, model, sft_examples, tok.pad_id, device, amp, log)
        else:
            if stage == "dpo":
                chunk = task.chunks[0]
                examples = [(tok.encode(e["prompt"]), tok.encode(e["chosen"]) + [tok.eos_id],
                             tok.encode(e["rejected"]) + [tok.eos_id], None) for e in chunk]
                opt_ = train_preferences(cfg, stage, model, examples, cfg.lr, 0.0,
                                         tok.pad_id, device, amp, log, seed=cfg.seed * 1000 + 1)
            else:
                t = int(stage.split("_")[1])
                opt_, info = selm_iteration(cfg, stage, t, model, task.chunks[t], tok, judge, device, amp, log)
        if stage == "sft":
            sft_model = copy.deepcopy(model).eval()
        row, answers = evaluate(cfg, stage, model, sft_model, task.eval, sft_answers, tok, judge, device, amp)
        if stage == "sft":
            sft_answers = answers
        row["time"] = round(time.time() - t0, 1)
        results.append(row)
        timings[stage] = row["time"]
        log.write({"eval": row, **({"online": info} if info else {})})
        state = {"model": model.state_dict(), "model_config": asdict(mcfg), "config": asdict(cfg),
                 "stage": stage, "stage_index": si, "results": results, "sft_answers": sft_answers,
                 "optimizer": opt_.state_dict() if opt_ is not None else None,
                 "rng": torch.get_rng_state(), "tokenizer": tok.name,
                 "prompt_template": data.make_prompt("{prompt}")}
        atomic_save(state, os.path.join(cfg.out_dir, f"{stage}.pt"))
        write_json_atomic(results, os.path.join(cfg.out_dir, "results.json"))
        print(f"[{stage:>7}] {row['time']:6.1f}s  reward {row['reward']:.3f}  "
              f"win vs ref {row['win_rate_vs_reference']:.3f}  win vs sft {row['win_rate_vs_sft']:.3f}  "
              f"perfect {row['perfect']:.1%}  length {row['length']:.1f}  kl {row['kl']:.2f}"
              + (f"  (y_ref chosen {info['y_ref_chosen']:.0%})" if info else ""))
    return results


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()
