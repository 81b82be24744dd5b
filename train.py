"""
train.py -- the whole SELM pipeline in one command, read top to bottom:

    python train.py --model small

Config -> SFT -> offline DPO (iteration 0: the reference is the SFT model) -> SELM
iterations t = 1..T (Algorithm 1: the reference is the previous iterate; its greedy answer
joins the offline pair; the judge keeps the best and the worst; one epoch of the SELM loss)
-> evaluation -> the main loop, which evaluates and checkpoints every stage. `--alpha 0` is
iterative online DPO. Plumbing lives in runtime.py, what goes to disk in checkpoint.py.
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import data
from checkpoint import commit, open_run, restore, stage_names, stage_state
from hf import export_stages
from inputs import build_model, check_config, tokenizer_and_data
from runtime import Clock, check_finite, judge_failure, lr_at, optimizer_step, parse_config, setup, summary_line
from selm import (candidates_of, dpo_loss, pairs_from_scores, preference_metrics, relabel_counts,
                  selm_loss, sequence_logps, win)


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model
    model: str = opt("small", "model preset: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    init_from: str = opt(None, "start from a Hugging Face model directory on disk (GPT-2, Llama, Mistral, Qwen2, Qwen3) "
                               "instead of a fresh --model")
    dropout: float = opt(0.0, "dropout in every block")
    # your own data (JSON Lines of strings, or of TRL's conversations: chat.py); without them the built-in task is used
    sft: str = opt(None, "SFT demonstrations: JSONL with 'prompt' and 'completion'")
    prefs: str = opt(None, "offline preference pairs: JSONL with 'prompt', 'chosen', 'rejected' "
                           "(split into iterations + 1 equal chunks)")
    prompts: str = opt(None, "evaluation prompts: JSONL with 'prompt' and optionally 'reference' (an answer to beat)")
    judge: str = opt(None, "the ranker: 'module:function' or 'file.py:function', judge(prompt, candidates) -> scores; "
                           "or 'rm:DIR', a reward model (*ForSequenceClassification directory)")
    bpe_path: str = opt(None, "directory with GPT-2's BPE files (vocab.bpe + encoder.json, or merges.txt + vocab.json)")
    block_size: int = opt(None, "context length of the fresh model (default: the preset's)")
    # the built-in task
    task_seed: int = opt(0, "seed of the built-in task's data (kept fixed across training seeds)")
    min_len: int = opt(7, "shortest word to sort")
    max_len: int = opt(10, "longest word to sort")
    n_sft: int = opt(None, "SFT demonstrations (default: per preset, see inputs.SCALE)")
    chunk_size: int = opt(None, "prompts per chunk; offline DPO uses chunk 1, SELM iteration t chunk t+1 (default: per preset)")
    n_eval: int = opt(None, "held-out evaluation prompts (default: per preset)")
    sft_passes: str = opt("1,3", "bubble-sort passes of the SFT demonstrations: lo,hi (more passes, better answers)")
    offline_passes: str = opt("0,4", "bubble-sort passes of the offline pairs' two responses: lo,hi")
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
    # the online step (the defaults are the authors' recipe)
    y_ref: str = opt("greedy", "how pi_ref answers each prompt: greedy (the authors' code), or sampled at --temperature")
    temperature: float = opt(1.0, "temperature of pi_ref's sampled answers (--y-ref sampled; answers after the first)")
    online_samples: int = opt(1, "n: answers of pi_ref that join each offline pair before the judge keeps the best "
                                 "and the worst (with --alpha 0 and n = 2: online DPO)")
    optimism_samples: int = opt(1, "m: answers y ~ pi_ref the optimism term averages over (Eq. 4.2 as written; "
                                   "more than 1 needs --y-ref sampled)")
    tie_order: str = opt("offline-first", "candidate order and tie rule: offline-first (the offline labels win ties), "
                                          "or authors ([y_ref, chosen, rejected], the first best and the first worst)")
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
    compile: bool = opt(False, "torch.compile the training forward and the sampler's decode step (one graph per "
                               "batch and cache-length bucket; CUDA graphs on CUDA); checkpoints hold the plain model")
    fsdp: bool = opt(False, "under torchrun, shard weights, gradients and AdamW state over the ranks (FSDP2) instead "
                            "of a full copy on each (DDP)")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward pass instead of "
                                                "keeping them: less memory for long responses, more compute")
    export: str = opt("", "after the run, write these stages as Hugging Face directories <out-dir>/hf-<stage>: "
                          "'last', 'all', or stage names separated by commas")


def parse_args(argv=None):
    return parse_config(Config, argv, "The SELM pipeline: SFT -> offline DPO -> SELM iterations, "
                                      "each stage evaluated and checkpointed.")


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
    """log pi_ref of every example's responses: (2 + m, N) on the device, rows chosen,
    rejected and (SELM) the m reference answers. examples: (prompt_ids, chosen_ids,
    rejected_ids, a tuple of m y_ref ids (empty for DPO)). The reference is the policy before
    its first update, so no second model copy is kept: these numbers are all the training
    epoch needs of it."""
    parts = [[ex[1] for ex in examples], [ex[2] for ex in examples]] + [list(ys) for ys in zip(*(ex[3] for ex in examples))]
    rows = [(ex[0], r) for part in parts for ex, r in zip(examples, part)]  # all chosen, all rejected, all y_ref_1, ...
    return rt.logps(ref, rows, tok.pad_id, 4 * cfg.micro_batch_size).to(rt.device).view(len(parts), len(examples))


def preference_epoch(rt, cfg, tok, stage, policy, examples, ref_logps, lr, alpha, seed):
    """One epoch of the SELM loss (DPO when the examples carry no y_ref) over `examples`
    (as reference_logps_of takes them), with the reference's log-probs given. Each optimizer step takes batch_size examples;
    under torchrun each rank takes its share, in micro-batches whose gradients are
    all-reduced only at the last one."""
    W, rank = rt.ranks.world, rt.ranks.rank
    with_ref = len(examples[0][3]) > 0
    fixed_len = max(len(ex[0]) + len(r) for ex in examples for r in (ex[1], ex[2], *ex[3]))
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
                                         *zip(*(examples[i][3] for i in mi)), pad_id=tok.pad_id)
            b = rt.to_device(b, fixed_len, tok.pad_id)
            with rt.accumulate(train_model, sync=k == len(micro) - 1), rt.autocast():
                # chosen, rejected (and the m y_ref) rows in one forward: (parts * B,)
                pol = sequence_logps(train_model, b["input_ids"], b["response_mask"]).view(-1, len(mi))
                ref = ref_logps[:, mi]
                if with_ref:  # SELM, Eq. 4.2; E_{y ~ pi_ref} estimated by the mean over the m y_ref
                    losses, cr, rr, optimism = selm_loss(pol[0], pol[1], ref[0], ref[1], pol[2:].mean(0), ref[2:].mean(0),
                                                         beta=cfg.beta, alpha=alpha, loss_type=cfg.loss_type,
                                                         return_optimism=True)
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
                 ()) for e in chunk]
    ref_logps = reference_logps_of(rt, cfg, tok, rt.unsharded(policy), examples)
    return preference_epoch(rt, cfg, tok, "dpo", policy, examples, ref_logps, cfg.lr, 0.0, seed=cfg.seed * 1000 + 1)


# ---- stages 3..: one SELM iteration ---------------------------------------------------------

def selm_iteration(rt, cfg, tok, t, policy, chunk, judge):
    """Iteration t of Algorithm 1 on chunk t: pi_{t-1} -> pi_t."""
    clock = Clock()
    # 1. pi_ref = pi_{t-1}: the policy as it enters. Everything the iteration needs of the
    #    reference is computed below, before the policy's first update.
    prompts = [ex["prompt"] for ex in chunk]
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    # 2. y_ref: pi_ref's answers to every prompt of the chunk, in token ids (the authors: one,
    #    greedy). One cut off at --max-new-tokens has no EOS and gets none: it is unfinished.
    ref, compiled = rt.unsharded(policy), rt.compile_seconds  # ref: pi_{t-1} itself (FSDP: a gathered copy)
    answers = reference_answers(rt, cfg, tok, ref, prompt_ids, seed=cfg.seed * 1000 + t)  # per prompt, k lists
    texts = [[tok.decode(r[:-1] if r[-1] in tok.eos_ids else r) for r in a] for a in answers]
    clock.lap("t_sample", compiling=rt.compile_seconds - compiled)  # a first compile is not sampling time
    # 3. the judge scores each prompt's candidates: the offline pair and n of pi_ref's answers
    n, order = cfg.online_samples, cfg.tie_order
    chosen, rejected = [ex["chosen"] for ex in chunk], [ex["rejected"] for ex in chunk]
    scores = rt.judge(judge, prompts, [candidates_of(w, ys[:n], l, order) for w, ys, l in zip(chosen, texts, rejected)],
                      cfg.gen_batch_size)
    # 4. the best and the worst candidates become the pair; m of pi_ref's answers are the
    #    example's reference responses for the optimism term, whatever their rank
    pairs = pairs_from_scores(scores, [tok.encode_response(x) for x in chosen], [tok.encode_response(x) for x in rejected],
                              [a[:n] for a in answers], order=order)
    clock.lap("t_judge")
    examples = [(p, *pair, tuple(a[:cfg.optimism_samples])) for p, pair, a in zip(prompt_ids, pairs, answers) if pair]
    counts = relabel_counts(scores, chosen, [ys[:n] for ys in texts], order)
    info = {"pairs": len(examples), "dropped_ties": len(pairs) - len(examples),
            "y_ref_chosen": counts.pop("y_ref_chosen") / max(1, len(examples)),
            **{f"y_ref_{k}": v for k, v in counts.items()},
            "y_ref_truncated": sum(r[-1] not in tok.eos_ids for a in answers for r in a)}
    opt_ = None
    if examples:
        # 5. the reference log-probs of chosen, rejected and y_ref, once, from pi_{t-1}
        ref_logps = reference_logps_of(rt, cfg, tok, ref, examples)
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


def reference_answers(rt, cfg, tok, ref, prompt_ids, seed):
    """k = max(n, m) answers of pi_ref per prompt (n: --online-samples, m: --optimism-samples):
    with --y-ref greedy, the greedy answer and k - 1 samples at --temperature; sampled: k samples."""
    k, greedy = max(cfg.online_samples, cfg.optimism_samples), cfg.y_ref == "greedy"
    first = sample_responses(rt, cfg, tok, ref, prompt_ids, 0.0 if greedy else cfg.temperature, seed)
    more = [sample_responses(rt, cfg, tok, ref, prompt_ids, cfg.temperature, seed + 7 * j) for j in range(1, k)]
    return [list(a) for a in zip(first, *more)]


def sample_responses(rt, cfg, tok, model, prompt_ids, temperature=0.0, seed=0):
    """Responses to every prompt (token lists, EOS included when emitted), sharded over ranks."""
    return rt.sample(model, prompt_ids, cfg.gen_batch_size, seed=seed, max_new_tokens=cfg.max_new_tokens,
                     temperature=temperature, eos_id=tok.eos_ids, pad_id=tok.pad_id, compile=cfg.compile)


# ---- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(rt, cfg, tok, stage, model, sft_model, d, sft_answers):
    """Greedy answers on held-out prompts, judged against the fixed reference answers and
    against the SFT model's answers (ties count half), plus KL(pi || pi_SFT) estimated as
    the mean of log pi(y) - log pi_SFT(y) over temperature-1 samples y ~ pi."""
    prompts = [e["prompt"] for e in d.eval]
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    model = rt.unsharded(model)
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

def about(cfg, tok, d):
    """What a stage checkpoint records of the run besides its state: the settings, the tokenizer
    (sample.py refuses another), and how prompts were written (sample.py writes its prompt so)."""
    return dict(config=asdict(cfg), tokenizer={"name": tok.name, "source": tok.source},
                prompt_template=d.prompt_template, conversational=d.conversational)


def run(cfg):
    check_config(cfg)
    rt = setup(cfg.device, cfg.dtype, cfg.out_dir, cfg.compile, cfg.fsdp, cfg.activation_checkpointing)
    stages = stage_names(cfg.iterations)
    ckpt, done = open_run(cfg.out_dir, stages, asdict(cfg), rt.ranks.main, rt.ranks.barrier)
    rt.say("config:", json.dumps(asdict(cfg)))
    tok, d = tokenizer_and_data(cfg, rt)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok, rt)
    sft_examples = data.check_fits(d, tok, model.config.block_size, cfg.sft or "built-in SFT data", cfg.prefs or "built-in pairs")
    # continue after the last stage trained (state: that stage, if its evaluation was cut short)
    results, sft_answers, sft_model, state = restore(ckpt, model, cfg.out_dir, rt.device, rt.log, rt.ranks.main)
    rt.prepare(model)  # --fsdp, --activation-checkpointing
    if ckpt is not None:
        rt.say(f"continuing after stage {done[-1]}" + ("'s training" if state else ""))
    for si, stage in enumerate(stages):
        if stage in done and (state is None or state["stage"] != stage):
            continue
        t0, info = time.time(), {}
        with judge_failure(stage, cfg.out_dir, saved=lambda: state is not None):
            if state is None:  # train the stage, and commit its weights before its evaluation
                opt_, info = train_stage(rt, cfg, tok, si, stage, model, d, sft_examples)
                state = stage_state(stage, model.config, *rt.state_dict(model, opt_), list(results), evaluated=False,
                                    stage_index=si, sft_answers=sft_answers, metrics_size=rt.log.size(), **about(cfg, tok, d))
                commit(cfg.out_dir, state, rt.ranks.main)
            sft_model = rt.unsharded(model, copy=True).eval() if stage == "sft" else sft_model
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
    if rt.ranks.main and cfg.export:
        rt.say("exported:", *export_stages(cfg.export, cfg.out_dir, stages, tok.source))
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
