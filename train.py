"""
train.py -- the whole SELM pipeline in one command, read top to bottom:

    python train.py --model small

Config -> SFT -> offline DPO (iteration 0: the reference is the SFT model) -> SELM
iterations t = 1..T (Algorithm 1: the reference is the previous iterate; its greedy answer
joins the offline pair; the judge keeps the best and the worst; one epoch of the SELM loss)
-> evaluation -> the main loop, which evaluates and checkpoints every stage. `--alpha 0` is
iterative online DPO. How a stage trains (SFT's steps, an epoch of the preference loss) lives in
training.py, plumbing in runtime.py, what goes to disk in checkpoint.py and outdir.py, what the
user is told in screens.py.
"""

import time
from dataclasses import asdict, dataclass, field

import torch

from checkpoint import commit, stage_names, stage_state
from commands import one_line_errors, parse_config
from data import Example
from hf import export_stages
from inputs import RECIPES, awaiting_pairs, build_model, check_config, check_inputs, tokenizer_and_data
from outdir import begin, check_start, claim_out_dir, judge_failure, restore, resume_advice, survey
from pairs import own_pairs
from runtime import sample_responses, setup
from screens import example_prompt, first_screen, last_screen, summary_line
from selm import Candidate, candidates_of, pairs_from_scores, penalise_unfinished, relabel_counts, win
from training import preference_epoch, reference_logps_of, train_sft

def setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """A run's settings, one flag each (python train.py --help). Every default is the one the default
    run uses (--task sorting, --model small); --model tiny and --task instructions change a few, as
    the one table inputs.RECIPES lists (and --help says beside each), and a flag you give wins."""
    # model
    model: str = setting("small", "model preset: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    init_from: str = setting(None, "start from a Hugging Face model directory on disk (GPT-2, Llama, Mistral, Qwen2, "
                                   "Qwen3) instead of a fresh --model")
    dropout: float = setting(0.0, "dropout in every block")
    # your own data (JSON Lines of strings, or of TRL's conversations: chat.py); without them the built-in task is used
    sft: str = setting(None, "SFT demonstrations: JSONL with 'prompt' and 'completion'")
    prefs: str = setting(None, "offline preference pairs: JSONL with 'prompt', 'chosen', 'rejected' "
                               "(split into iterations + 1 equal chunks)")
    train_prompts: str = setting(None, "training prompts instead of --prefs: JSONL with 'prompt', split into "
                                       "iterations + 1 equal chunks; the --init-from model's --pair-samples answers "
                                       "to each, judged by --judge, make its offline pair")
    prompts: str = setting(None, "evaluation prompts, held out from training: JSONL with 'prompt' and maybe "
                                 "'reference' (an answer to beat)")
    judge: str = setting(None, "the ranker: 'module:function' or 'file.py:function', judge(prompt, candidates) -> "
                               "scores; or 'rm:DIR', a reward model (*ForSequenceClassification directory)")
    bpe_path: str = setting(None, "directory of GPT-2 BPE files: vocab.bpe + encoder.json, or merges.txt + vocab.json")
    block_size: int = setting(None, "context length of the fresh model (default: the preset's)")
    # the built-in tasks
    task: str = setting("sorting", "the task when no data files are given, a file of tasks/: sorting (the letters of a "
                                   "word, for a fresh --model), instructions (verifiable instructions, for a chat "
                                   "model given by --init-from), or one of your own")
    task_seed: int = setting(0, "seed of the built-in task's data and of the answers that make offline pairs (kept "
                                "fixed across training seeds)")
    min_len: int = setting(7, "shortest word to sort")
    max_len: int = setting(10, "longest word to sort")
    n_sft: int = setting(8192, "SFT demonstrations")
    chunk_size: int = setting(1024, "prompts per chunk: offline DPO's, then each iteration's")
    n_eval: int = setting(512, "held-out evaluation prompts")
    sft_passes: str = setting("1,3", "bubble-sort passes of the SFT demonstrations: lo,hi (more: better answers)")
    offline_passes: str = setting("0,4", "bubble-sort passes of the offline pairs' two responses: lo,hi")
    pair_samples: int = setting(4, "--train-prompts and a chat model's task: answers of the starting model per prompt, "
                                   "at temperature 1, whose best and worst by the judge make the prompt's offline pair")
    # SFT
    sft_steps: int = setting(1500, "SFT optimizer steps")
    sft_lr: float = setting(2e-3, "SFT peak learning rate")
    sft_batch_size: int = setting(64, "SFT batch size")
    # DPO and SELM
    iterations: int = setting(3, "SELM iterations after offline DPO, 0 to stop after it")
    alpha: float = setting(0.001, "SELM optimism coefficient, 0 = iterative DPO")
    beta: float = setting(2.0, "DPO/SELM inverse temperature")
    loss_type: str = setting("sigmoid", "preference loss: sigmoid (DPO) or ipo")
    lr: float = setting(1e-4, "peak learning rate of offline DPO and of SELM iteration 1")
    lr_decay: float = setting(1.0, "each SELM iteration's learning rate is the previous one's times this")
    batch_size: int = setting(32, "preference pairs per optimizer step")
    micro_batch_size: int = setting(32, "pairs per forward pass, gradient accumulation when smaller")
    warmup: float = setting(0.1, "fraction of each stage's steps spent warming the learning rate up")
    weight_decay: float = setting(0.0, "AdamW weight decay for DPO/SELM")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = off)")
    # the online step (the defaults are the authors' recipe)
    y_ref: str = setting("greedy", "how pi_ref answers: greedy (as in the authors' code), or sampled at --temperature")
    temperature: float = setting(1.0, "pi_ref's sampling temperature (--y-ref sampled; answers after the first)")
    online_samples: int = setting(1, "n: answers of pi_ref that join each offline pair before the judge keeps the best "
                                     "and the worst (with --alpha 0 and n = 2: online DPO; 0 with --alpha 0: the "
                                     "offline pairs alone, with the moving reference: offline DPO at the same compute)")
    optimism_samples: int = setting(1, "m: answers y ~ pi_ref the optimism term averages over (Eq. 4.2 as written; "
                                       "more than 1 needs --y-ref sampled)")
    tie_order: str = setting("offline-first", "candidate order and tie rule: offline-first (the offline labels win "
                                              "ties), or authors ([y_ref, chosen, rejected], the first best and the "
                                              "first worst)")
    missing_eos_penalty: float = setting(0.0, "subtracted from the judge's score of an answer cut off at "
                                              "--max-new-tokens wherever the model's own answers are ranked for "
                                              "training (offline pairs made by the model, the online step), as TRL's "
                                              "setting of this name; 1 ranks every finished answer first when scores "
                                              "lie in [0, 1]. Evaluation keeps the judge's own scores")
    # sampling and evaluation
    max_new_tokens: int = setting(None, "response length cap (default: --max-len + 4, a sorted word and room to spare; "
                                        "with --prefs: 64)")
    gen_batch_size: int = setting(256, "prompts per call of the sampler")
    kl_samples: int = setting(1, "temperature-1 samples per eval prompt for the KL(pi || pi_SFT) estimate")
    # run
    seed: int = setting(0, "training seed (initialisation, batch order, sampling)")
    device: str = setting("auto", "auto picks cuda, then mps, then cpu")
    dtype: str = setting("auto", "float32, bfloat16 or float16 autocast; the weights and AdamW stay fp32, log-probs "
                                 "and losses are fp32, sampling runs in this dtype (auto: bf16 on a GPU that has it, "
                                 "and on a CPU with AMX or AVX512-BF16 for a model 256 or more wide; else fp32)")
    out_dir: str = setting("out", "where checkpoints, metrics.jsonl and results.json go")
    resume: bool = setting(False, "continue from the last completed stage in --out-dir")
    start_from: str = setting(None, "skip the stages up to and including the one saved in this checkpoint of another "
                                    "run (same model, task, SFT and seed); they are copied into --out-dir")
    log_every: int = setting(10, "write a metrics line every this many steps")
    compile: bool = setting(False, "torch.compile the training forward and the sampler's decode step "
                                   "(one graph per batch and cache-length bucket; CUDA graphs on CUDA); "
                                   "checkpoints hold the plain model")
    fsdp: bool = setting(False, "under torchrun, shard weights, gradients and AdamW state over the ranks (FSDP2) "
                                "instead of a full copy on each (DDP)")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass instead "
                                                    "of keeping them: less memory for long responses, more compute")
    export: str = setting("", "after the run, write these stages as Hugging Face directories <out-dir>/hf-<stage>: "
                              "'last', 'all', or stage names separated by commas")


def parse_args(argv=None):
    return parse_config(Config, argv, "The SELM pipeline: SFT -> offline DPO -> SELM iterations, each stage evaluated "
                                      "and checkpointed.", RECIPES, prog="train.py")


# ---- seeds ------------------------------------------------------------------------------------

def seed_for(seed, purpose, stage=0, k=0):
    """The seed of one kind of random draw, from --seed, by its purpose and the stage's number (sft 0,
    dpo 1, selm_t t + 1); k numbers repeated draws. A resumed run draws what an uninterrupted one draws."""
    return {"init": seed,                               # the fresh model's weights
            "sft_batches": seed,                        # the demonstrations of each SFT step
            "stage": seed * 1000 + stage,               # torch's global RNG in the stage (dropout)
            "batches": seed * 1000 + stage,             # the batch order of a preference epoch
            "y_ref": seed * 1000 + stage - 1 + 7 * k,   # pi_ref's k-th answers in a SELM stage
            "kl": seed * 7919 + 100_003 * k}[purpose]   # the k-th KL samples of every evaluation


# ---- stage 2: offline DPO (stage 1, SFT, is training.train_sft) ----------------------------

def offline_dpo(rt, cfg, tok, policy, chunk):
    """DPO on the chunk's fixed pairs; the reference is the policy as it enters (the SFT model)."""
    examples = [Example(tok.encode_prompt(e["prompt"]), *map(tok.encode_response, (e["chosen"], e["rejected"])))
                for e in chunk]
    ref_logps = reference_logps_of(rt, cfg, tok, rt.unsharded(policy), examples, "dpo")
    return preference_epoch(rt, cfg, tok, "dpo", policy, examples, ref_logps, cfg.lr, 0.0,
                            seed_for(cfg.seed, "batches", 1))


# ---- stages 3..: one SELM iteration ---------------------------------------------------------

def selm_iteration(rt, cfg, tok, t, policy, chunk, judge):
    """Iteration t of Algorithm 1 on chunk t: pi_{t-1} -> pi_t. Returns (its optimizer, step 7's record)."""
    clock, stage, n, m = rt.clock(), t + 1, cfg.online_samples, cfg.optimism_samples  # the clock counts compiling apart
    prompts, chosen, rejected = ([ex[k] for ex in chunk] for k in ("prompt", "chosen", "rejected"))
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    if n == 0:  # --online-samples 0 (and --alpha 0): the offline pairs alone, the reference moving
        return offline_iteration(rt, cfg, tok, t, policy, chunk, prompt_ids, clock)
    # 1. pi_ref = pi_{t-1}: the policy as it enters (FSDP: a gathered copy). Everything the
    #    iteration needs of the reference is computed below, before the policy's first update.
    ref = rt.unsharded(policy)
    # 2. y_ref: pi_ref's answers to every prompt of the chunk, in token ids (the authors: one,
    #    greedy). One cut off at --max-new-tokens has no EOS and gets none: it is unfinished.
    answers = reference_answers(rt, cfg, tok, ref, prompt_ids, stage)  # per prompt, k lists
    clock.lap("t_sample")
    # 3. each prompt's candidates, built once with their text and ids: the offline pair and n
    #    of pi_ref's answers; the judge scores their text
    candidates = [candidates_of(Candidate.of_text(w, tok), [Candidate.of_ids(y, tok) for y in ys[:n]],
                                Candidate.of_text(l, tok), cfg.tie_order)
                  for w, ys, l in zip(chosen, answers, rejected)]
    judged = rt.judge(judge, prompts, [[c.text for c in cs] for cs in candidates], cfg.gen_batch_size,
                      f"selm_{t}: judging")
    # an answer cut off at --max-new-tokens ranks lower by --missing-eos-penalty (0: not at all)
    scores = penalise_unfinished(judged, [[c.finished for c in cs] for cs in candidates], cfg.missing_eos_penalty)
    # 4. the best and the worst candidates become the pair; m of pi_ref's answers are the
    #    example's reference responses for the optimism term, whatever their rank
    pairs = pairs_from_scores(scores, candidates, order=cfg.tie_order)
    examples = [Example(p, pair[0].ids, pair[1].ids, tuple(ys[:m])) for p, pair, ys in zip(prompt_ids, pairs, answers)
                if pair]
    clock.lap("t_judge")
    optimizer = None
    if examples:
        # 5. the reference log-probs of chosen, rejected and y_ref, once, from pi_{t-1}
        ref_logps = reference_logps_of(rt, cfg, tok, ref, examples, f"selm_{t}")
        clock.lap("t_ref_logps")
        # 6. one epoch of the SELM loss: the policy becomes pi_t
        optimizer = preference_epoch(rt, cfg, tok, f"selm_{t}", policy, examples, ref_logps,
                                     cfg.lr * cfg.lr_decay ** (t - 1), cfg.alpha, seed_for(cfg.seed, "batches", stage))
        clock.lap("t_train")
    else:  # e.g. the judge tied every candidate of every prompt
        rt.say(f"warning: stage selm_{t} has no preference pairs to train on; the model is unchanged")
    # 7. what happened: pairs kept, ties, how y_ref fared, truncated answers, the time of each step
    info = {**online_record(cfg, tok, scores, candidates, answers, len(examples)), **clock.laps}
    rt.log.write({"stage": f"selm_{t}", "online": info})
    return optimizer, info


def offline_iteration(rt, cfg, tok, t, policy, chunk, prompt_ids, clock):
    """Iteration t with nothing sampled (--online-samples 0, --alpha 0): DPO on chunk t's offline
    pairs against pi_{t-1}, the same optimizer steps as an online iteration over the same chunk
    takes, so that it measures what the online answers add at equal compute."""
    examples = [Example(p, *map(tok.encode_response, (e["chosen"], e["rejected"]))) for p, e in zip(prompt_ids, chunk)]
    ref_logps = reference_logps_of(rt, cfg, tok, rt.unsharded(policy), examples, f"selm_{t}")
    clock.lap("t_ref_logps")
    optimizer = preference_epoch(rt, cfg, tok, f"selm_{t}", policy, examples, ref_logps,
                                 cfg.lr * cfg.lr_decay ** (t - 1), 0.0, seed_for(cfg.seed, "batches", t + 1))
    clock.lap("t_train")
    info = {"pairs": len(examples), "dropped_ties": 0, **clock.laps}
    rt.log.write({"stage": f"selm_{t}", "online": info})
    return optimizer, info


def online_record(cfg, tok, scores, candidates, answers, kept):
    """Step 7's counts: pairs kept and prompts dropped for a full tie; how pi_ref's best answer
    fared against the offline chosen one (selm.relabel_counts); answers cut off unfinished, and
    the candidates whose score --missing-eos-penalty lowered."""
    counts = relabel_counts(scores, candidates, cfg.tie_order)
    return {"pairs": kept, "dropped_ties": len(scores) - kept,
            "y_ref_chosen": counts.pop("y_ref_chosen") / max(1, kept), **{f"y_ref_{k}": v for k, v in counts.items()},
            "y_ref_truncated": sum(r[-1] not in tok.eos_ids for a in answers for r in a),
            "penalised": sum(not c.finished for cs in candidates for c in cs) if cfg.missing_eos_penalty else 0}


def reference_answers(rt, cfg, tok, ref, prompt_ids, stage):
    """k = max(n, m) answers of pi_ref per prompt (n: --online-samples, m: --optimism-samples):
    with --y-ref greedy, the greedy answer and k - 1 samples at --temperature; sampled: k samples.
    A prompt's answers share its prefill, in one batch; the j-th draws with its own seed."""
    k, greedy = max(cfg.online_samples, cfg.optimism_samples), cfg.y_ref == "greedy"
    temperatures = [0.0 if greedy and j == 0 else cfg.temperature for j in range(k)]
    return sample_responses(rt, cfg, tok, ref, prompt_ids, temperatures,
                            [seed_for(cfg.seed, "y_ref", stage, j) for j in range(k)], f"selm_{stage - 1}: y_ref")


# ---- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(rt, cfg, tok, stage, model, sft_model, task_data, sft_answers):
    """Greedy answers on held-out prompts, judged against the fixed reference answers and
    against the SFT model's answers (ties count half), plus KL(pi || pi_SFT) estimated as
    the mean of log pi(y) - log pi_SFT(y) over temperature-1 samples y ~ pi."""
    prompts = [e["prompt"] for e in task_data.eval]
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    model = rt.unsharded(model)
    # the greedy answer and the KL's temperature-1 samples of a prompt, in one batch (one prefill)
    n_kl = cfg.kl_samples if stage != "sft" else 0  # at the SFT stage pi is pi_SFT: KL is 0, not estimated
    runs = sample_responses(rt, cfg, tok, model, prompt_ids, [0.0] + [1.0] * n_kl,
                            [0] + [seed_for(cfg.seed, "kl", k=k) for k in range(n_kl)], f"{stage} eval: answers")
    ids = [[t for t in run[0] if t not in tok.eos_ids] for run in runs]  # greedy
    answers = [tok.decode(r) for r in ids]
    sft_answers = answers if sft_answers is None else sft_answers
    has_ref = all(e["reference"] is not None for e in task_data.eval)
    candidates = [[a, s] + ([e["reference"]] if has_ref else [])
                  for a, s, e in zip(answers, sft_answers, task_data.eval)]
    scores = rt.judge(task_data.judge, prompts, candidates, cfg.gen_batch_size, f"{stage} eval: judging")
    n = len(prompts)
    kl = 0.0
    if n_kl:
        rows = [(p, run[1 + k]) for k in range(n_kl) for p, run in zip(prompt_ids, runs) if run[1 + k]]
        lp, lq = (rt.logps(m, rows, tok.pad_id, 4 * cfg.micro_batch_size, f"{stage} eval: KL log-probs")
                  for m in (model, sft_model))
        kl = (lp - lq).mean().item()
    row = {"stage": stage, "win_rate_vs_reference": sum(win(s[0], s[2]) for s in scores) / n if has_ref else None,
           "win_rate_vs_sft": sum(win(s[0], s[1]) for s in scores) / n, "reward": sum(s[0] for s in scores) / n,
           "perfect": sum(s[0] >= 1.0 for s in scores) / n if task_data.builtin else None,  # 1.0 = sorted: built-in
           "length": sum(len(i) for i in ids) / n, "kl": kl, **(task_data.metrics(prompts, answers)
                                                                  if task_data.metrics else {})}
    return row, answers


# ---- the main loop --------------------------------------------------------------------------

def about(cfg, tok, task_data):
    """What a stage checkpoint records of the run besides its state: the settings, the tokenizer
    (sample.py refuses another), and how prompts were written (sample.py writes its prompt so)."""
    return dict(config=asdict(cfg), tokenizer={"name": tok.name, "source": tok.source},
                prompt_template=task_data.prompt_template, conversational=task_data.conversational)


def run(cfg):
    """Every input read and checked (settings, data and judge, model, the checkpoints continued
    from); only then --out-dir claimed (one run at a time) and written, and the stages run."""
    check_config(cfg)
    rt = setup(cfg.device, cfg.dtype, cfg.out_dir, cfg.compile, cfg.fsdp, cfg.activation_checkpointing)
    stages = stage_names(cfg.iterations)
    tok, task_data = tokenizer_and_data(cfg, rt)
    torch.manual_seed(seed_for(cfg.seed, "init"))
    model = build_model(cfg, tok, rt)
    rt.fit_dtype(cfg.dtype, model)  # --dtype auto: bf16 where the hardware and the model's width gain from it
    sft_examples = check_inputs(cfg, tok, task_data, model.config.block_size)
    start = check_start(cfg.start_from, stages, asdict(cfg), model.config) if cfg.start_from else None
    with claim_out_dir(cfg.out_dir, rt.ranks, create=not cfg.resume):
        ckpt, done = survey(cfg.out_dir, stages, asdict(cfg), model.config, start)
        made = None
        if awaiting_pairs(task_data):  # prompts whose offline pairs are the starting model's own answers, judged
            task_data, made = own_pairs(rt, cfg, tok, model, task_data)
            check_inputs(cfg, tok, task_data, model.config.block_size)
        begin(cfg.out_dir, ckpt, start, rt.log, rt.ranks)  # the run's first writes
        return run_stages(rt, cfg, tok, model, task_data, sft_examples, ckpt, done, made)


def run_stages(rt, cfg, tok, model, task_data, sft_examples, ckpt, done, made=None):
    """Each stage after those `done` (ckpt: the last one's) trained, committed, evaluated, committed again;
    made: what pairs.own_pairs recorded of offline pairs it made from the starting model's answers."""
    stages = stage_names(cfg.iterations)
    rt.say(first_screen(cfg, tok, task_data, model, rt))
    if made and not cfg.resume:  # what the offline pairs hold (a resumed run's log has it)
        rt.log.write({"offline_pairs": made})
    # continue after the last stage trained (state: that stage, if its evaluation was cut short)
    results, sft_answers, sft_model, state = restore(ckpt, model, cfg.out_dir, rt.device)
    rt.prepare(model)  # --fsdp, --activation-checkpointing
    if ckpt is not None:
        rt.say(f"continuing after stage {done[-1]}" + ("'s training" if state else ""))
    for si, stage in enumerate(stages):
        if stage in done and (state is None or state["stage"] != stage):
            continue
        t0, info = time.time(), {}
        with judge_failure(stage, cfg.out_dir, saved=lambda: state is not None):
            if state is None:  # train the stage, and commit its weights before its evaluation
                _, info = train_stage(rt, cfg, tok, si, stage, model, task_data, sft_examples)  # its optimizer: done
                state = stage_state(stage, model.config, rt.state_dict(model), list(results), evaluated=False,
                                    stage_index=si, sft_answers=sft_answers, metrics_size=rt.log.size(),
                                    **about(cfg, tok, task_data))
                commit(cfg.out_dir, state, rt.ranks.main)
            sft_model = rt.unsharded(model, copy=True).eval() if stage == "sft" else sft_model
            row, answers = evaluate(rt, cfg, tok, stage, model, sft_model, task_data, sft_answers)
        sft_answers = answers if stage == "sft" else sft_answers
        results.append(row)  # results.json holds no timings: a resumed run reproduces it exactly
        seconds = time.time() - t0
        rt.log.write({"eval": row, "time": round(seconds, 2), **({"online": info} if info else {}), "answers": answers})
        state.update(results=results, evaluated=True, sft_answers=sft_answers, metrics_size=rt.log.size())
        commit(cfg.out_dir, state, rt.ranks.main)
        state = None
        rt.ranks.barrier()
        rt.say(summary_line(stage, seconds, row, info))
    exported = export_stages(cfg.export, cfg.out_dir, stages, tok.source) if rt.ranks.main and cfg.export else []
    rt.say(last_screen(cfg.out_dir, stages, exported, example_prompt(task_data)))
    rt.ranks.close()
    return results


def train_stage(rt, cfg, tok, si, stage, model, task_data, sft_examples):
    """Train stage number si; returns (its optimizer, what a SELM iteration logged)."""
    torch.manual_seed(seed_for(cfg.seed, "stage", si))  # each stage's randomness independent of resume
    if stage == "sft":
        return train_sft(rt, cfg, tok, model, sft_examples, seed_for(cfg.seed, "sft_batches")), {}
    if stage == "dpo":
        return offline_dpo(rt, cfg, tok, model, task_data.chunks[0]), {}
    return selm_iteration(rt, cfg, tok, si - 1, model, task_data.chunks[si - 1], task_data.judge)  # selm_t: chunk t


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_errors("train.py", interrupted=lambda: resume_advice(cfg.out_dir, asdict(cfg))):
        run(cfg)  # its first step checks every setting (check_config), then every input, before any write


if __name__ == "__main__":
    main()
