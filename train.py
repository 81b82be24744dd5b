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
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import task as sorting
from checkpoint import atomic_save, atomic_write, load_checkpoint, model_from_checkpoint
from model import GPT, preset
from sample import generate
from selm import (dpo_loss, online_pairs, optimism_term, preference_metrics, reference_logps,
                  selm_loss, sequence_logps)


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model
    model: str = opt("small", "model preset: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    init_from: str = opt(None, "start from a Hugging Face GPT-2 directory on disk instead of a fresh --model")
    dropout: float = opt(0.0, "dropout in every block")
    # your own data (JSON Lines); without them the built-in sorting task is used
    sft: str = opt(None, "SFT demonstrations: JSONL with 'prompt' and 'completion'")
    prefs: str = opt(None, "offline preference pairs: JSONL with 'prompt', 'chosen', 'rejected' "
                           "(split into iterations + 1 equal chunks)")
    prompts: str = opt(None, "evaluation prompts: JSONL with 'prompt' and optionally 'reference' (an answer to beat)")
    judge: str = opt(None, "the ranker, 'module:function' or 'file.py:function': judge(prompt, candidates) -> scores")
    bpe_path: str = opt(None, "directory with GPT-2's BPE files (vocab.bpe + encoder.json, or merges.txt + vocab.json)")
    block_size: int = opt(None, "context length of the fresh model (default: the preset's)")
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
    compile: bool = opt(False, "torch.compile the training forward (sampling and checkpoints use the plain model)")


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
    if cfg.max_new_tokens is None:  # a sorted word is as long as the word; other data: 64
        cfg.max_new_tokens = 64 if cfg.prefs else cfg.max_len + 4
    return cfg


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="The SELM pipeline: SFT -> offline DPO -> SELM iterations, "
                                             "each stage evaluated and checkpointed.",
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
    for name in ("sft_batch_size", "batch_size", "micro_batch_size", "chunk_size", "n_eval", "gen_batch_size",
                 "max_new_tokens"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if cfg.sft_steps < 0:
        raise ValueError("--sft-steps must be >= 0 (0 skips SFT training)")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    preset(cfg.model)  # unknown preset -> clear error


# ---- devices, processes, files, logging --------------------------------------------------

def pick_device(name, local_rank=0):
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":  # under torchrun each process takes its own GPU
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def amp_dtype(device, dtype):
    """bf16 autocast on GPUs that support it (fp16 otherwise); fp32 on CPU by default.
    Log-softmax stays fp32 either way (selm.sequence_logps)."""
    if dtype == "auto":
        dtype = "float32" if device.type != "cuda" else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    return None if dtype == "float32" else getattr(torch, dtype)


class Dist:
    """The processes torchrun started (or just this one). Work that produces data --
    sampling, judging, scoring -- is cut into fixed blocks; block b goes to rank b % world,
    and the results are gathered in block order, so every rank ends up with the same data
    in the same order, identical to a single process doing every block itself."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0

    def init(self, device):
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def map_blocks(self, fn, items, block):
        """[fn(start, items[start:start + block]) for each block], concatenated in order."""
        starts = range(0, len(items), block)
        mine = [(s, fn(s, items[s:s + block])) for s in starts[self.rank::self.world]]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
            mine = [x for part in parts for x in part]
        return [y for _, out in sorted(mine, key=lambda t: t[0]) for y in out]

    def gather(self, items):
        """Every rank's list, concatenated in rank order."""
        if self.world == 1:
            return items
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def write_json_atomic(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), binary=False)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed line by line; only
    rank 0 writes.

    A crash can tear the last line, and a stage that was running when the process died
    wrote lines that its rerun will write again. So every checkpoint records the file's
    length, and on --resume the file is cut back to that length (`truncate`)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def write(self, row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()

    def size(self):
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def truncate(self, size):
        if self.enabled and os.path.exists(self.path):
            with open(self.path, "r+") as f:
                f.truncate(size)


def read_metrics(path):
    """The rows of a metrics.jsonl, skipping a torn (unparseable) last line."""
    rows = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 2 or (i == len(lines) - 2 and lines[-1] != ""):
                raise ValueError(f"{path}:{i + 1}: corrupted line (not the last one)") from None
    return rows


@dataclass
class Run:
    """What every stage needs besides the model: settings, device, tokenizer, log, ranks."""
    cfg: Config
    device: torch.device
    dtype: object  # autocast dtype, or None for plain fp32
    tok: object
    log: MetricsLog
    dist: Dist
    last_ref_seconds: float = 0.0  # time of the last stage's reference log-probs

    def autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def wrap(self, model):
        """The module to train through: DDP under torchrun, optionally compiled. Sampling,
        scoring and saving always use the plain `model`."""
        m = model
        if self.dist.world > 1:
            m = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            m = torch.compile(m, dynamic=False)
        return m

    def to_device(self, batch, fixed_len):
        """Move a collated batch to the device. Under --compile, first right-pad it to the
        stage's longest sequence: one shape for the whole stage means one compiled graph
        (padding is masked out of every loss, and right padding never touches real tokens)."""
        if self.cfg.compile:
            extra = fixed_len - batch["input_ids"].shape[1]
            batch = {k: F.pad(v, (0, extra), value=self.tok.pad_id if k == "input_ids" else False)
                     for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def bar(self, iterable, desc):
        return tqdm(iterable, desc=desc, leave=False, mininterval=1.0, disable=not self.dist.main)


def lr_at(step, total, peak, warmup):
    """Linear warmup over the first `warmup` fraction of steps, then cosine to zero."""
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def check_finite(loss, stage, step):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) in stage {stage} at step {step}; "
                                 "lower the learning rate (the last good checkpoint is intact)")


def optimizer_step(R, model, opt_, stage, step):
    if R.cfg.grad_clip:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), R.cfg.grad_clip)
        if not torch.isfinite(gn):
            raise FloatingPointError(f"non-finite gradient in stage {stage} at step {step}; "
                                     "lower the learning rate (the last good checkpoint is intact)")
    opt_.step()


# ---- stage 1: SFT ----------------------------------------------------------------------

def train_sft(R, model, examples):
    """Cross-entropy on response tokens only (the prompt is given, not learned), averaged
    over the response tokens of the global batch. Under torchrun every rank draws the same
    global batch and takes its share; DDP averages gradients over ranks, so each rank
    scales its token sum by world / (global token count)."""
    cfg, W = R.cfg, R.dist.world
    fixed_len = max(len(p) + len(r) for p, r in examples)
    train_model = R.wrap(model)
    opt_ = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    g = torch.Generator().manual_seed(cfg.seed)
    bar = R.bar(range(cfg.sft_steps), "sft")
    for step in bar:
        idx = torch.randint(len(examples), (cfg.sft_batch_size,), generator=g).tolist()
        n_tokens = sum(len(examples[i][1]) for i in idx)
        b = R.to_device(data.collate([examples[i] for i in idx[R.dist.rank::W]], R.tok.pad_id), fixed_len)
        target_mask = b["response_mask"][:, 1:]  # token t is predicted at position t-1
        with R.autocast():
            logits = train_model(b["input_ids"][:, :-1], output_mask=target_mask)  # (N, V)
        loss = F.cross_entropy(logits.float(), b["input_ids"][:, 1:][target_mask], reduction="sum")
        loss = loss * W / n_tokens
        check_finite(loss, "sft", step)
        for group in opt_.param_groups:
            group["lr"] = lr_at(step, cfg.sft_steps, cfg.sft_lr, 0.05)
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(R, model, opt_, "sft", step)
        if step % cfg.log_every == 0 or step == cfg.sft_steps - 1:
            total = sum(R.dist.gather([loss.item() / W]))
            R.log.write({"stage": "sft", "step": step, "loss": total, "lr": opt_.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{total:.3f}")
    return opt_


# ---- stages 2..: DPO and SELM on a list of preference examples --------------------------

def logps_of(R, model, rows, batch_size):
    """Summed response log-probs of (prompt_ids, response_ids) rows under `model`, without
    grad in eval mode (selm.reference_logps), sharded over ranks: (N,) fp32 on the CPU."""
    def score(_, block):
        batches = (data.collate(block[i:i + batch_size], R.tok.pad_id) for i in range(0, len(block), batch_size))
        with R.autocast():
            return reference_logps(model, batches).float().cpu().tolist()
    return torch.tensor(R.dist.map_blocks(score, rows, batch_size), dtype=torch.float32)


def train_preferences(R, stage, policy, examples, lr, alpha, seed):
    """One epoch of the SELM loss (DPO when there is no y_ref).

    examples: list of (prompt_ids, chosen_ids, rejected_ids, y_ref_ids or None).
    The reference is the policy as it enters the stage (the SFT model for offline DPO,
    pi_{t-1} for SELM iteration t), so its log-probs are computed here, once, before the
    first update, under no_grad: no second model in memory, nothing recomputed per step.
    Each optimizer step takes batch_size examples; under torchrun each rank takes its share
    of them, in micro-batches whose gradients are all-reduced only at the last one.
    """
    cfg, W, rank = R.cfg, R.dist.world, R.dist.rank
    if not examples:  # e.g. the judge tied every candidate of every prompt
        if R.dist.main:
            print(f"warning: stage {stage} has no preference pairs to train on; the model is unchanged")
        return None
    with_ref = examples[0][3] is not None
    parts = [1, 2, 3] if with_ref else [1, 2]
    rows = [(ex[0], ex[k]) for k in parts for ex in examples]  # all chosen, all rejected, (all y_ref)
    t0 = time.time()
    ref_logps = logps_of(R, policy, rows, 4 * cfg.micro_batch_size).to(R.device)
    R.last_ref_seconds = time.time() - t0  # reported in selm_iteration's timing breakdown
    ref_logps = ref_logps.view(len(parts), len(examples))  # (2 or 3, N)

    fixed_len = max(len(r[0]) + len(r[1]) for r in rows)
    train_model = R.wrap(policy)
    opt_ = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    # a batch too small to give every rank an example is dropped (only ever the last one)
    order = [b for b in data.batches(len(examples), cfg.batch_size, seed=seed) if len(b) >= W]
    policy.train()
    bar = R.bar(order, stage)
    for step, idx in enumerate(bar):
        for group in opt_.param_groups:
            group["lr"] = lr_at(step, len(order), lr, cfg.warmup)
        opt_.zero_grad(set_to_none=True)
        mine = idx[rank::W]
        micro = [mine[m:m + cfg.micro_batch_size] for m in range(0, len(mine), cfg.micro_batch_size)]
        stats = []
        for k, mi in enumerate(micro):
            b = data.collate_preferences([examples[i][0] for i in mi], [examples[i][1] for i in mi],
                                         [examples[i][2] for i in mi],
                                         [examples[i][3] for i in mi] if with_ref else None,
                                         pad_id=R.tok.pad_id)
            b = R.to_device(b, fixed_len)
            sync = k == len(micro) - 1 or W == 1
            with (nullcontext() if sync else train_model.no_sync()), R.autocast():
                # chosen, rejected (and y_ref) rows in one forward: (parts * B,)
                logps = sequence_logps(train_model, b["input_ids"], b["response_mask"])
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
                # a sum over examples / the global batch size: the gradient is the batch mean
                # whatever the micro-batch size, and DDP's average over ranks is undone by W
                loss = losses.sum() * W / len(idx)
                check_finite(loss, stage, step)
                loss.backward()
            stats.append(torch.stack([losses.detach(), cr, rr, pol[0].detach(), pol[1].detach(), optimism], 1))
        optimizer_step(R, policy, opt_, stage, step)
        if step % cfg.log_every == 0 or step == len(order) - 1:
            cat = torch.tensor(R.dist.gather(torch.cat(stats).cpu().tolist())).T  # (6, batch)
            row = preference_metrics(cat[0], cat[1], cat[2], policy_chosen_logps=cat[3],
                                     policy_rejected_logps=cat[4], optimism=cat[5])
            R.log.write({"stage": stage, "step": step, "lr": opt_.param_groups[0]["lr"], **row})
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
    return opt_


def sample_responses(R, model, prompt_ids, temperature=0.0, seed=0):
    """Responses to every prompt (token lists, EOS included when emitted), sharded over ranks
    in blocks of gen_batch_size; the seed of a block depends only on its position."""
    def fn(start, block):
        r, _ = generate(model, block, R.cfg.max_new_tokens, temperature=temperature,
                        eos_id=R.tok.eos_id, pad_id=R.tok.pad_id, seed=seed + start)
        return r
    return R.dist.map_blocks(fn, prompt_ids, R.cfg.gen_batch_size)


def greedy_responses(R, model, prompt_ids):
    """Greedy responses for a list of prompts: (token lists without EOS, texts)."""
    ids = [[t for t in r if t != R.tok.eos_id] for r in sample_responses(R, model, prompt_ids)]
    return ids, [R.tok.decode(r) for r in ids]


def judge_blocks(R, judge, prompts, candidates):
    """data.call_judge on every (prompt, candidate list), sharded over ranks."""
    items = list(zip(prompts, candidates))
    return R.dist.map_blocks(lambda _, blk: [data.call_judge(judge, p, c) for p, c in blk],
                             items, R.cfg.gen_batch_size)


def selm_iteration(R, stage, t, policy, chunk, judge):
    """One online iteration (SELM.md, Algorithm 1): sample, judge, build pairs, train."""
    cfg, tok = R.cfg, R.tok
    # pi_ref = pi_{t-1} is the policy as it enters this iteration: sample from it now,
    # score with it in train_preferences before the first update, and the reference moves.
    prompts = [ex["prompt"] for ex in chunk]
    prompt_ids = [tok.encode(p) for p in prompts]
    t0 = time.time()
    y_ref_ids, y_ref = greedy_responses(R, policy, prompt_ids)
    t_sample = time.time() - t0
    t0 = time.time()
    # the judge sees [chosen, y_ref, rejected]; scores come back sharded, the ranking is cheap
    scores = judge_blocks(R, judge, prompts, [[ex["chosen"], yr, ex["rejected"]] for ex, yr in zip(chunk, y_ref)])
    replay = iter(scores)  # online_pairs asks the judge in this same order: replay its scores
    pairs = online_pairs(lambda prompt, candidates: next(replay), prompts,
                         [ex["chosen"] for ex in chunk], [ex["rejected"] for ex in chunk], y_ref)
    t_judge = time.time() - t0
    examples, n_ref_best, n_tied = [], 0, 0
    for p_ids, pair, yr, yr_text in zip(prompt_ids, pairs, y_ref_ids, y_ref):
        if pair is None:  # all three candidates scored the same: no preference to learn
            n_tied += 1
            continue
        chosen, rejected = pair
        n_ref_best += chosen == yr_text
        examples.append((p_ids, tok.encode(chosen) + [tok.eos_id], tok.encode(rejected) + [tok.eos_id],
                         yr + [tok.eos_id]))
    lr = cfg.lr * cfg.lr_decay ** (t - 1)
    t0 = time.time()
    opt_ = train_preferences(R, stage, policy, examples, lr, cfg.alpha, seed=cfg.seed * 1000 + t + 1)
    t_ref = R.last_ref_seconds if examples else 0.0
    info = {"pairs": len(examples), "dropped_ties": n_tied, "y_ref_chosen": n_ref_best / max(1, len(examples)),
            "t_sample": t_sample, "t_judge": t_judge, "t_ref_logps": t_ref,
            "t_train": time.time() - t0 - t_ref}
    R.log.write({"stage": stage, "online": info})
    return opt_, info


# ---- evaluation ------------------------------------------------------------------------

@torch.no_grad()
def evaluate(R, stage, model, sft_model, eval_set, sft_answers, judge, builtin):
    """Greedy answers on held-out prompts, judged against the fixed reference answers and
    against the SFT model's answers (ties count half), plus KL(pi || pi_SFT) estimated as
    the mean of log pi(y) - log pi_SFT(y) over temperature-1 samples y ~ pi."""
    cfg = R.cfg
    prompts = [e["prompt"] for e in eval_set]
    prompt_ids = [R.tok.encode(p) for p in prompts]
    ids, answers = greedy_responses(R, model, prompt_ids)
    sft_answers = answers if sft_answers is None else sft_answers
    has_ref = all(e["reference"] is not None for e in eval_set)
    scores = judge_blocks(R, judge, prompts, [[a, s] + ([e["reference"]] if has_ref else [])
                                              for a, s, e in zip(answers, sft_answers, eval_set)])
    win_ref = win_sft = reward = perfect = 0.0
    for sa, ss, *sr in scores:
        win_ref += (1.0 if sa > sr[0] else 0.5 if sa == sr[0] else 0.0) if has_ref else 0.0
        win_sft += 1.0 if sa > ss else 0.5 if sa == ss else 0.0
        reward += sa
        perfect += sa >= 1.0
    n = len(prompts)
    kl = 0.0
    if sft_model is not model and cfg.kl_samples > 0:
        rows = []
        for k in range(cfg.kl_samples):
            ys = sample_responses(R, model, prompt_ids, temperature=1.0, seed=cfg.seed * 7919 + 100_003 * k)
            rows += [(p, y) for p, y in zip(prompt_ids, ys) if y]
        lp = logps_of(R, model, rows, 4 * cfg.micro_batch_size)
        lq = logps_of(R, sft_model, rows, 4 * cfg.micro_batch_size)
        kl = (lp - lq).mean().item()
    row = {"stage": stage, "win_rate_vs_reference": win_ref / n if has_ref else None,
           "win_rate_vs_sft": win_sft / n, "reward": reward / n,
           "perfect": perfect / n if builtin else None,  # "score 1.0" means "sorted" only in the built-in task
           "length": sum(len(i) for i in ids) / n, "kl": kl}
    return row, answers


# ---- data ---------------------------------------------------------------------------------

@dataclass
class Data:
    sft: list  # (prompt, response) strings
    chunks: list  # T + 1 lists of {"prompt", "chosen", "rejected"}
    eval: list  # {"prompt", "reference" (or None)}
    judge: object  # judge(prompt, candidates) -> list of scores
    builtin: bool  # the built-in task: its judge's score 1.0 means "fully correct"


def load_data(cfg):
    """The built-in task, or the user's JSONL files and judge. Everything is read and
    checked here, before any training: a malformed record stops the run with its file,
    line and field, and nothing is trained on partial data."""
    user = [cfg.sft, cfg.prefs, cfg.prompts, cfg.judge]
    if not any(user):
        task = sorting.make_task(seed=cfg.task_seed, n_sft=cfg.n_sft, n_prompts_per_chunk=cfg.chunk_size,
                              n_chunks=cfg.iterations + 1, n_eval=cfg.n_eval,
                              min_len=cfg.min_len, max_len=cfg.max_len)
        return Data(task.sft, task.chunks, task.eval, sorting.judge, True)
    if not (cfg.prefs and cfg.prompts and cfg.judge):
        raise ValueError("your own data needs --prefs, --prompts and --judge together "
                         "(the built-in judge only scores the sorting task); --sft is optional")
    if cfg.sft is None and cfg.init_from is None and cfg.sft_steps > 0:
        raise ValueError("--prefs without --sft: give --sft demonstrations, or --init-from a "
                         "pretrained model with --sft-steps 0")
    judge = data.load_judge(cfg.judge)
    sft = [(r["prompt"], r["completion"]) for r in data.load_jsonl(cfg.sft, ("prompt", "completion"))] if cfg.sft else []
    prefs = data.load_jsonl(cfg.prefs, ("prompt", "chosen", "rejected"))
    n = len(prefs) // (cfg.iterations + 1)
    if n == 0:
        raise ValueError(f"{cfg.prefs}: {len(prefs)} pairs cannot fill {cfg.iterations + 1} chunks "
                         f"(offline DPO + {cfg.iterations} iterations)")
    chunks = [prefs[i * n:(i + 1) * n] for i in range(cfg.iterations + 1)]
    evals = [{"prompt": r["prompt"], "reference": r.get("reference")}
             for r in data.load_jsonl(cfg.prompts, ("prompt",))]
    return Data(sft, chunks, evals, judge, False)


def get_tokenizer(cfg, verbose=True):
    """GPT-2's BPE for GPT-2 weights (from --bpe-path, the --init-from directory, or
    tiktoken's cache); otherwise whatever data.get_tokenizer finds."""
    path = cfg.bpe_path
    if path is None and cfg.init_from and any(
            os.path.isfile(os.path.join(cfg.init_from, f)) for f in ("vocab.bpe", "merges.txt")):
        path = cfg.init_from
    tok = data.get_tokenizer(path, verbose=verbose)
    if cfg.init_from and tok.name != "gpt2":
        raise ValueError(f"--init-from {cfg.init_from} needs GPT-2's BPE, which is not on this machine: "
                         "put merges.txt and vocab.json (or vocab.bpe and encoder.json) in that "
                         "directory or in --bpe-path")
    return tok


# ---- the pipeline ----------------------------------------------------------------------

def encode_all(pairs, tok, block_size, where):
    out = []
    for i, (p, r) in enumerate(pairs):
        try:
            out.append(data.encode_pair(tok, p, r, block_size))
        except data.DataError as e:
            raise data.DataError(f"{where}, record {i + 1}: {e}") from None
    return out


def stage_names(cfg):
    return ["sft", "dpo"] + [f"selm_{t}" for t in range(1, cfg.iterations + 1)]


def prepare_out_dir(path):
    """Create --out-dir, prove it writable, and sweep away temporary files that a killed
    process left half-written (atomic writes go through .tmp-* files, then a rename)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {path} is not writable ({e.strerror})") from None
    for name in os.listdir(path):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(path, name))


# The fields that decide what the SFT and offline DPO stages produce: a run may start from
# another run's stage checkpoint only if these agree (see --start-from).
SHARED_BY_STAGE = {
    "sft": ("model", "init_from", "sft", "prefs", "prompts", "judge", "bpe_path", "block_size",
            "dropout", "task_seed", "min_len", "max_len", "n_sft", "n_eval",
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
        ck["config"], ck["metrics_size"] = asdict(cfg), 0  # the other run's log stays there
        atomic_save(ck, os.path.join(cfg.out_dir, f"{s}.pt"))
    for s in stages[len(done):]:  # whatever a former run left in out_dir is not ours
        if os.path.exists(os.path.join(cfg.out_dir, f"{s}.pt")):
            os.unlink(os.path.join(cfg.out_dir, f"{s}.pt"))
    write_json_atomic(src["results"], os.path.join(cfg.out_dir, "results.json"))


def summary_line(stage, seconds, row, info):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (f"[{stage:>7}] {seconds:6.1f}s  reward {row['reward']:.3f}  "
            f"win vs ref {fmt(row['win_rate_vs_reference'], '.3f')}  win vs sft {row['win_rate_vs_sft']:.3f}  "
            f"perfect {fmt(row['perfect'], '.1%')}  length {row['length']:.1f}  kl {row['kl']:.2f}"
            + (f"  (y_ref chosen {info['y_ref_chosen']:.0%})" if info else ""))


def run(cfg):
    check_config(cfg)
    ranks = Dist()
    device = pick_device(cfg.device, ranks.local_rank)
    ranks.init(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    say = print if ranks.main else (lambda *a, **k: None)
    if ranks.main:
        prepare_out_dir(cfg.out_dir)
    ranks.barrier()
    stages = stage_names(cfg)
    if cfg.start_from and cfg.resume:
        raise ValueError("--start-from and --resume exclude each other")
    if cfg.start_from:
        if ranks.main:
            adopt_stages(cfg, stages)
        ranks.barrier()
    done = []  # stages already completed (--resume, or adopted by --start-from)
    ckpt = None
    if cfg.resume or cfg.start_from:
        done = [s for s in stages if os.path.isfile(os.path.join(cfg.out_dir, f"{s}.pt"))]
        if not done:
            raise ValueError(f"--resume: no checkpoint in {cfg.out_dir}")
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, f"{done[-1]}.pt"))
        skip = ("resume", "device", "start_from", "compile")
        saved = {k: v for k, v in ckpt["config"].items() if k not in skip}
        now = {k: v for k, v in asdict(cfg).items() if k not in skip}
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            raise ValueError(f"--resume: configuration differs from the checkpoint's in {', '.join(diff)}")
    say("config:", json.dumps(asdict(cfg)))

    tok = get_tokenizer(cfg, verbose=ranks.main)
    task = load_data(cfg)
    judge = task.judge
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
        mcfg = model.config
    else:
        mcfg = preset(cfg.model, vocab_size=tok.vocab_size, dropout=cfg.dropout, block_size=cfg.block_size)
        model = GPT(mcfg)
    model.to(device)
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids, the model only {mcfg.vocab_size}")
    # Every text is encoded and checked against the context now: a prompt or pair that does
    # not fit is refused (data.encode_pair), never silently truncated.
    sft_examples = encode_all(task.sft, tok, mcfg.block_size, cfg.sft or "built-in SFT data")
    encode_all([(e["prompt"], e[k]) for c in task.chunks for e in c for k in ("chosen", "rejected")],
               tok, mcfg.block_size, cfg.prefs or "built-in pairs")
    for e in task.eval + [e for c in task.chunks for e in c]:
        if len(tok.encode(e["prompt"])) >= mcfg.block_size - 1:
            raise ValueError(f"prompt {e['prompt'][:40]!r}... leaves no room for a response in the "
                             f"context of {mcfg.block_size} tokens")
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), enabled=ranks.main)
    R = Run(cfg, device, amp_dtype(device, cfg.dtype), tok, log, ranks)
    results, sft_answers, sft_model = [], None, None
    if ckpt is not None:
        if ckpt["model_config"] != asdict(mcfg):
            raise ValueError(f"checkpoint in {cfg.out_dir} holds a different model "
                             f"({ckpt['model_config']}) than --model {cfg.model} ({asdict(mcfg)})")
        model.load_state_dict(model_from_checkpoint(ckpt).state_dict())
        results, sft_answers = ckpt["results"], ckpt["sft_answers"]
        sft_ckpt = load_checkpoint(os.path.join(cfg.out_dir, "sft.pt"))
        sft_model = model_from_checkpoint(sft_ckpt, "sft.pt").to(device).eval()
        log.truncate(ckpt.get("metrics_size", log.size()))  # drop what the interrupted stage logged
        if ranks.main:
            write_json_atomic(results, os.path.join(cfg.out_dir, "results.json"))
        say(f"continuing after stage {done[-1]}")
    say(f"model: {cfg.model if not cfg.init_from else cfg.init_from}, {model.num_params() / 1e6:.2f}M "
        f"parameters, device {device}" + (f", {ranks.world} processes" if ranks.world > 1 else ""))

    for si, stage in enumerate(stages):
        if stage in done:
            continue
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1000 + si)  # each stage's randomness independent of resume
        info = {}
        if stage == "sft":
            opt_ = train_sft(R, model, sft_examples)
            sft_model = copy.deepcopy(model).eval()
        elif stage == "dpo":
            examples = [(tok.encode(e["prompt"]), tok.encode(e["chosen"]) + [tok.eos_id],
                         tok.encode(e["rejected"]) + [tok.eos_id], None) for e in task.chunks[0]]
            opt_ = train_preferences(R, stage, model, examples, cfg.lr, 0.0, seed=cfg.seed * 1000 + 1)
        else:
            t = int(stage.split("_")[1])
            opt_, info = selm_iteration(R, stage, t, model, task.chunks[t], judge)
        row, answers = evaluate(R, stage, model, sft_model, task.eval, sft_answers, judge, task.builtin)
        if stage == "sft":
            sft_answers = answers
        results.append(row)  # results.json holds no timings: a resumed run reproduces it exactly
        seconds = time.time() - t0
        log.write({"eval": row, "time": round(seconds, 2), **({"online": info} if info else {})})
        if ranks.main:
            # the checkpoint is the commit point of a stage: written atomically, and only
            # then results.json, which --resume rewrites from it anyway
            state = {"model": model.state_dict(), "model_config": asdict(mcfg), "config": asdict(cfg),
                     "stage": stage, "stage_index": si, "results": results, "sft_answers": sft_answers,
                     "optimizer": opt_.state_dict() if opt_ is not None else None,
                     "rng": torch.get_rng_state(), "tokenizer": tok.name, "metrics_size": log.size(),
                     "prompt_template": sorting.make_prompt("{prompt}") if task.builtin else "{prompt}"}
            atomic_save(state, os.path.join(cfg.out_dir, f"{stage}.pt"))
            write_json_atomic(results, os.path.join(cfg.out_dir, "results.json"))
        ranks.barrier()
        say(summary_line(stage, seconds, row, info))
    return results


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (ValueError, OSError, FloatingPointError) as e:  # DataError is a ValueError
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"train.py: interrupted; `--resume` continues after the last completed stage in {cfg.out_dir}")


if __name__ == "__main__":
    main()
