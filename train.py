"""
train.py -- the whole SELM pipeline in one command, read top to bottom:

    python train.py --model small

Config -> SFT -> offline DPO (iteration 0: the reference is the SFT model) -> SELM
iterations t = 1..T (Algorithm 1: the reference is the previous iterate; its greedy answer
joins the offline pair; the judge keeps the best and the worst; one epoch of the SELM loss)
-> evaluation -> the main loop, which evaluates and checkpoints every stage. `--alpha 0` is
iterative online DPO. Plumbing lives in runtime.py, what goes to disk in checkpoint.py.
"""

import copy
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import data
from checkpoint import commit, judge_failure, open_run, restore, stage_names, stage_state
from inputs import build_model, get_tokenizer, load_data
from model import preset
from runtime import Clock, check_finite, lr_at, optimizer_step, parse_config, setup, summary_line
from selm import (candidates_of, check_hparams, dpo_loss, pairs_from_scores, preference_metrics, relabel_counts,
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
SCALE = {"tiny": dict(n_sft=4096, chunk_size=512, n_eval=256, sft_steps=800),
         "default": dict(n_sft=8192, chunk_size=1024, n_eval=512, sft_steps=1500)}


def parse_args(argv=None):
    return parse_config(Config, argv, "The SELM pipeline: SFT -> offline DPO -> SELM iterations, "
                                      "each stage evaluated and checkpointed.")


def resolve(cfg):
    """Fill the per-preset defaults (fields left at None)."""
    for k, v in SCALE.get(cfg.model, SCALE["default"]).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.max_new_tokens is None:  # a sorted word is as long as the word; other data: 64
        cfg.max_new_tokens = 64 if cfg.prefs else cfg.max_len + 4
    return cfg


def check_config(cfg):
    """Impossible settings fail here, in one line, before anything is written."""
    resolve(cfg)
    try:
        check_hparams(cfg.beta, cfg.alpha, cfg.loss_type)  # the losses' own rules, checked once
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    positive = ("sft_batch_size", "batch_size", "micro_batch_size", "chunk_size", "n_eval", "gen_batch_size",
                "max_new_tokens")
    problems = {**{f"--{n.replace('_', '-')} must be positive": getattr(cfg, n) <= 0 for n in positive},
                f"--iterations must be >= 0, got {cfg.iterations}": cfg.iterations < 0,
                "--sft-steps must be >= 0 (0 skips SFT training)": cfg.sft_steps < 0,
                f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size {cfg.micro_batch_size}":
                    cfg.micro_batch_size > 0 and cfg.batch_size % cfg.micro_batch_size,
                f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}":
                    cfg.dtype not in ("auto", "float32", "bfloat16", "float16"),
                "--start-from and --resume exclude each other": cfg.start_from and cfg.resume}
    for message, bad in problems.items():
        if bad:
            raise ValueError(message)
    preset(cfg.model)  # unknown preset -> clear error


# ---- stage 1: SFT -------------------------------------------------------------------------

def train_sft(rt, cfg, tok, model, examples):
    """Cross-entropy on response tokens only (the prompt is given, not learned), averaged
    over the response tokens of the global batch. Under torchrun every rank draws the same
    global batch and takes its share; DDP averages gradients over ranks, so each rank
    scales its token sum by world / (global token count)."""
    if not examples:  # --init-from weights and no --sft file: the stage keeps the weights
        return None
    W = rt.ranks.world
    fixed_len = max(len(p) + len(r) for p, r in examples)
    train_model = rt.wrap(model)
    opt_ = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    g = torch.Generator().manual_seed(cfg.seed)
    bar = rt.bar(range(cfg.sft_steps), "sft")
    for step in bar:
        idx = torch.randint(len(examples), (cfg.sft_batch_size,), generator=g).tolist()
        n_tokens = sum(len(examples[i][1]) for i in idx)
        b = rt.to_device(data.collate([examples[i] for i in idx[rt.ranks.rank::W]], tok.pad_id), fixed_len, tok.pad_id)
        target_mask = b["response_mask"][:, 1:]  # token t is predicted at position t-1
        with rt.autocast():
            logits = train_model(b["input_ids"][:, :-1], output_mask=target_mask)  # (N, V)
        loss = F.cross_entropy(logits.float(), b["input_ids"][:, 1:][target_mask], reduction="sum") * W / n_tokens
        check_finite(loss, "sft", step)
        for group in opt_.param_groups:
            group["lr"] = lr_at(step, cfg.sft_steps, cfg.sft_lr, 0.05)
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(model, opt_, cfg.grad_clip, "sft", step)
        if step % cfg.log_every == 0 or step == cfg.sft_steps - 1:
            total = sum(rt.ranks.gather([loss.item() / W]))
            rt.log.write({"stage": "sft", "step": step, "loss": total, "lr": opt_.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{total:.3f}")
    return opt_


# ---- what offline DPO and SELM share: reference log-probs, one epoch of the loss ----------

def reference_logps_of(rt, cfg, tok, ref, examples):
    """log pi_ref of every example's responses: (2 or 3, N) on the device, rows chosen,
    rejected and (for SELM) y_ref. examples: (prompt_ids, chosen_ids, rejected_ids, y_ref_ids
    or None). The reference is the policy before its first update, so no second model copy
    is kept: these numbers are all the training epoch needs of it."""
    parts = [1, 2, 3] if examples[0][3] is not None else [1, 2]
    rows = [(ex[0], ex[k]) for k in parts for ex in examples]  # all chosen, all rejected, (all y_ref)
    return rt.logps(ref, rows, tok.pad_id, 4 * cfg.micro_batch_size).to(rt.device).view(len(parts), len(examples))


def preference_epoch(rt, cfg, tok, stage, policy, examples, ref_logps, lr, alpha, seed):
    """One epoch of the SELM loss (DPO when the examples carry no y_ref) over `examples`,
    with the reference's log-probs given. Each optimizer step takes batch_size examples;
    under torchrun each rank takes its share, in micro-batches whose gradients are
    all-reduced only at the last one."""
    W, rank = rt.ranks.world, rt.ranks.rank
    with_ref = examples[0][3] is not None
    fixed_len = max(len(ex[0]) + len(ex[k]) for ex in examples for k in ((1, 2, 3) if with_ref else (1, 2)))
    train_model = rt.wrap(policy)
    opt_ = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    # a batch too small to give every rank an example is dropped (only ever the last one)
    order = [b for b in data.batches(len(examples), cfg.batch_size, seed=seed) if len(b) >= W]
    policy.train()
    bar = rt.bar(order, stage)
    for step, idx in enumerate(bar):
        for group in opt_.param_groups:
            group["lr"] = lr_at(step, len(order), lr, cfg.warmup)
        opt_.zero_grad(set_to_none=True)
        mine = idx[rank::W]
        micro = [mine[m:m + cfg.micro_batch_size] for m in range(0, len(mine), cfg.micro_batch_size)]
        stats = []
        for k, mi in enumerate(micro):
            b = data.collate_preferences(*([examples[i][j] for i in mi] for j in range(3)),
                                         [examples[i][3] for i in mi] if with_ref else None, pad_id=tok.pad_id)
            b = rt.to_device(b, fixed_len, tok.pad_id)
            sync = k == len(micro) - 1 or W == 1
            with (nullcontext() if sync else train_model.no_sync()), rt.autocast():
                # chosen, rejected (and y_ref) rows in one forward: (parts * B,)
                pol = sequence_logps(train_model, b["input_ids"], b["response_mask"]).view(-1, len(mi))
                ref = ref_logps[:, mi]
                if with_ref:  # SELM, Eq. 4.2
                    losses, cr, rr, optimism = selm_loss(pol[0], pol[1], ref[0], ref[1], pol[2], ref[2], beta=cfg.beta,
                                                         alpha=alpha, loss_type=cfg.loss_type, return_optimism=True)
                else:  # offline DPO: no reference response, no optimism term
                    losses, cr, rr = dpo_loss(pol[0], pol[1], ref[0], ref[1], beta=cfg.beta, loss_type=cfg.loss_type)
                    optimism = torch.zeros_like(cr)
                # a sum over examples / the global batch size: the gradient is the batch mean
                # whatever the micro-batch size, and DDP's average over ranks is undone by W
                loss = losses.sum() * W / len(idx)
                check_finite(loss, stage, step)
                loss.backward()
            stats.append(torch.stack([losses.detach(), cr, rr, pol[0].detach(), pol[1].detach(), optimism], 1))
        optimizer_step(policy, opt_, cfg.grad_clip, stage, step)
        if step % cfg.log_every == 0 or step == len(order) - 1:
            cat = torch.tensor(rt.ranks.gather(torch.cat(stats).cpu().tolist())).T  # (6, batch)
            row = preference_metrics(cat[0], cat[1], cat[2], policy_chosen_logps=cat[3],
                                     policy_rejected_logps=cat[4], optimism=cat[5])
            rt.log.write({"stage": stage, "step": step, "lr": opt_.param_groups[0]["lr"], **row})
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
    return opt_


# ---- stage 2: offline DPO -------------------------------------------------------------------

def offline_dpo(rt, cfg, tok, policy, chunk):
    """DPO on the chunk's fixed pairs; the reference is the policy as it enters (the SFT model)."""
    examples = [(tok.encode_prompt(e["prompt"]), tok.encode_response(e["chosen"]), tok.encode_response(e["rejected"]),
                 None) for e in chunk]
    ref_logps = reference_logps_of(rt, cfg, tok, policy, examples)
    return preference_epoch(rt, cfg, tok, "dpo", policy, examples, ref_logps, cfg.lr, 0.0, seed=cfg.seed * 1000 + 1)


# ---- stages 3..: one SELM iteration ---------------------------------------------------------

def selm_iteration(rt, cfg, tok, t, policy, chunk, judge):
    """Iteration t of Algorithm 1 on chunk t: pi_{t-1} -> pi_t."""
    clock = Clock()
    # 1. pi_ref = pi_{t-1}: the policy as it enters. Everything the iteration needs of the
    #    reference is computed below, before the policy's first update.
    prompts = [ex["prompt"] for ex in chunk]
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    # 2. y_ref: the reference's greedy answer to every prompt of the chunk, in token ids. One
    #    cut off at --max-new-tokens has no EOS and gets none: it is no finished answer.
    y_ref_ids = sample_responses(rt, cfg, tok, policy, prompt_ids)
    y_ref = [tok.decode(r[:-1] if r[-1] in tok.eos_ids else r) for r in y_ref_ids]
    clock.lap("t_sample")
    # 3. the judge scores each prompt's candidates (selm.CANDIDATES order)
    chosen, rejected = [ex["chosen"] for ex in chunk], [ex["rejected"] for ex in chunk]
    scores = rt.judge(judge, prompts, [candidates_of(w, r, l) for w, r, l in zip(chosen, y_ref, rejected)],
                      cfg.gen_batch_size)
    # 4. the best and the worst of the three become the pair; y_ref stays the example's
    #    reference response whatever its rank
    pairs = pairs_from_scores(scores, [tok.encode_response(x) for x in chosen],
                              [tok.encode_response(x) for x in rejected], y_ref_ids)
    clock.lap("t_judge")
    examples = [(p, *pair, yr) for p, pair, yr in zip(prompt_ids, pairs, y_ref_ids) if pair is not None]
    n = relabel_counts(scores, chosen, y_ref)
    info = {"pairs": len(examples), "dropped_ties": len(pairs) - len(examples),
            "y_ref_chosen": n.pop("y_ref_chosen") / max(1, len(examples)), **{f"y_ref_{k}": v for k, v in n.items()},
            "y_ref_truncated": sum(r[-1] not in tok.eos_ids for r in y_ref_ids)}
    opt_ = None
    if examples:
        # 5. the reference log-probs of chosen, rejected and y_ref, once, from pi_{t-1}
        ref_logps = reference_logps_of(rt, cfg, tok, policy, examples)
        clock.lap("t_ref_logps")
        # 6. one epoch of the SELM loss: the policy becomes pi_t
        lr = cfg.lr * cfg.lr_decay ** (t - 1)
        opt_ = preference_epoch(rt, cfg, tok, f"selm_{t}", policy, examples, ref_logps, lr, cfg.alpha,
                                seed=cfg.seed * 1000 + t + 1)
        clock.lap("t_train")
    else:  # e.g. the judge tied every candidate of every prompt
        rt.say(f"warning: stage selm_{t} has no preference pairs to train on; the model is unchanged")
    # 7. what happened: pairs kept, ties, how y_ref fared, truncated answers, the time of each step
    info.update(clock.laps)
    rt.log.write({"stage": f"selm_{t}", "online": info})
    return opt_, info


def sample_responses(rt, cfg, tok, model, prompt_ids, temperature=0.0, seed=0):
    """Responses to every prompt (token lists, EOS included when emitted), sharded over ranks."""
    return rt.sample(model, prompt_ids, cfg.gen_batch_size, seed=seed, max_new_tokens=cfg.max_new_tokens,
                     temperature=temperature, eos_id=tok.eos_ids, pad_id=tok.pad_id, compile=cfg.compile)


# ---- evaluation -----------------------------------------------------------------------------

def win(score_a, score_b):
    """One comparison of a win rate: 1 for a win, 0.5 for a tie, 0 for a loss."""
    return 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0


@torch.no_grad()
def evaluate(rt, cfg, tok, stage, model, sft_model, d, sft_answers):
    """Greedy answers on held-out prompts, judged against the fixed reference answers and
    against the SFT model's answers (ties count half), plus KL(pi || pi_SFT) estimated as
    the mean of log pi(y) - log pi_SFT(y) over temperature-1 samples y ~ pi."""
    prompts = [e["prompt"] for e in d.eval]
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    ids = [[t for t in r if t not in tok.eos_ids] for r in sample_responses(rt, cfg, tok, model, prompt_ids)]  # greedy
    answers = [tok.decode(r) for r in ids]
    sft_answers = answers if sft_answers is None else sft_answers
    has_ref = all(e["reference"] is not None for e in d.eval)
    scores = rt.judge(d.judge, prompts, [[a, s] + ([e["reference"]] if has_ref else [])
                                         for a, s, e in zip(answers, sft_answers, d.eval)], cfg.gen_batch_size)
    n = len(prompts)
    kl = 0.0  # at the SFT stage pi is pi_SFT: KL is 0 by definition, not estimated
    if stage != "sft" and cfg.kl_samples > 0:
        rows = []
        for k in range(cfg.kl_samples):
            ys = sample_responses(rt, cfg, tok, model, prompt_ids, temperature=1.0, seed=cfg.seed * 7919 + 100_003 * k)
            rows += [(p, y) for p, y in zip(prompt_ids, ys) if y]
        lp, lq = (rt.logps(m, rows, tok.pad_id, 4 * cfg.micro_batch_size) for m in (model, sft_model))
        kl = (lp - lq).mean().item()
    row = {"stage": stage, "win_rate_vs_reference": sum(win(s[0], s[2]) for s in scores) / n if has_ref else None,
           "win_rate_vs_sft": sum(win(s[0], s[1]) for s in scores) / n, "reward": sum(s[0] for s in scores) / n,
           "perfect": sum(s[0] >= 1.0 for s in scores) / n if d.builtin else None,  # "1.0 = sorted": built-in only
           "length": sum(len(i) for i in ids) / n, "kl": kl}
    return row, answers


# ---- the main loop --------------------------------------------------------------------------

def run(cfg):
    check_config(cfg)
    rt = setup(cfg.device, cfg.dtype, cfg.out_dir, cfg.compile)
    stages = stage_names(cfg.iterations)
    ckpt, done = open_run(cfg.out_dir, stages, asdict(cfg), rt.ranks.main, rt.ranks.barrier)
    rt.say("config:", json.dumps(asdict(cfg)))
    tok = get_tokenizer(cfg, verbose=rt.ranks.main)
    d = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok, rt)
    sft_examples = data.check_fits(d, tok, model.config.block_size, cfg.sft or "built-in SFT data",
                                   cfg.prefs or "built-in pairs")
    results, sft_answers, sft_model, state = [], None, None, None
    if ckpt is not None:  # continue after the last stage trained; evaluate it if that was cut short
        results, sft_answers, sft_model = restore(ckpt, model, cfg.out_dir, rt.device, rt.log, rt.ranks.main)
        state = None if ckpt.get("evaluated", True) else ckpt
        rt.say(f"continuing after stage {done[-1]}" + ("'s training" if state else ""))
    for si, stage in enumerate(stages):
        if stage in done and (state is None or state["stage"] != stage):
            continue
        t0, info = time.time(), {}
        with judge_failure(stage, cfg.out_dir, saved=lambda: state is not None):
            if state is None:  # train the stage, and commit its weights before its evaluation
                opt_, info = train_stage(rt, cfg, tok, si, stage, model, d, sft_examples)
                state = stage_state(stage, model, opt_, list(results), evaluated=False, config=asdict(cfg),
                                    stage_index=si, sft_answers=sft_answers, tokenizer={"name": tok.name, "source": tok.source},
                                    metrics_size=rt.log.size(), prompt_template=d.prompt_template)
                commit(cfg.out_dir, state, rt.ranks.main)
            sft_model = copy.deepcopy(model).eval() if stage == "sft" else sft_model
            row, answers = evaluate(rt, cfg, tok, stage, model, sft_model, d, sft_answers)
        sft_answers = answers if stage == "sft" else sft_answers
        results.append(row)  # results.json holds no timings: a resumed run reproduces it exactly
        seconds = time.time() - t0
        rt.log.write({"eval": row, "time": round(seconds, 2), **({"online": info} if info else {})})
        state.update(results=results, evaluated=True, sft_answers=sft_answers, metrics_size=rt.log.size())
        commit(cfg.out_dir, state, rt.ranks.main)
        state = None
        rt.ranks.barrier()
        rt.say(summary_line(stage, seconds, row, info))
    return results


def train_stage(rt, cfg, tok, si, stage, model, d, sft_examples):
    """Train stage number si; returns (its optimizer, what a SELM iteration logged)."""
    torch.manual_seed(cfg.seed * 1000 + si)  # each stage's randomness independent of resume
    if stage == "sft":
        return train_sft(rt, cfg, tok, model, sft_examples), {}
    if stage == "dpo":
        return offline_dpo(rt, cfg, tok, model, d.chunks[0]), {}
    return selm_iteration(rt, cfg, tok, si - 1, model, d.chunks[si - 1], d.judge)  # selm_t on chunk t = si - 1


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (ValueError, OSError, FloatingPointError) as e:  # DataError is a ValueError
        if os.environ.get("SELM_DEBUG"):
            raise  # the whole traceback, the judge's own included, on request
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"train.py: interrupted; `--resume` continues after the last completed stage in {cfg.out_dir}")


if __name__ == "__main__":
    main()
