"""
analyse.py -- what each stage of a finished train.py run does, measured through the
pipeline's own sampling, scoring, judging and y_ref step (train.py, runtime.Runtime):

    python -m experiments.analyse out/run [--k 8] [--diag-prompts 128]

Per stage, into <run>/analysis.json (resumable: a stage already there is not redone):
  answers        greedy answers to the eval prompts (the sweep's and the study's head-to-head)
  distinct, best_of_k, mean_of_k, best_of_8, pass_at_k
                 k temperature-1 samples on each of the first --diag-prompts eval prompts:
                 distinct answers, best and mean reward, best of the first 8, any exactly right
  r_chosen, r_samples
                 the implicit reward beta * log(pi / pi_ref), pi_ref the previous stage, of the
                 chosen responses of the stage's training pairs (the first --diag-prompts of its
                 chunk, relabelled as the stage relabelled them: the run's y_ref mode, number of
                 answers, seeds, tie order and judge) and of k fresh samples on those prompts
  y_ref_chosen   from the run's own log: the share of pairs whose chosen was pi_ref's answer
The analysis runs on the CPU in fp32, whatever device the run trained on.
"""

import argparse
import dataclasses
import math
import os
import statistics
import time
from typing import NamedTuple

import torch

import chat
import inputs
import train
from checkpoint import load_checkpoint, model_from_checkpoint, stage_path
from commands import one_line_errors
from files import write_json_atomic
from runtime import Runtime, read_metrics, setup
from selm import Candidate, candidates_of, pairs_from_scores
from experiments.runner import read_json


class RunData(NamedTuple):
    """A finished run as the pipeline sees it: its Runtime (CPU), its configuration, tokenizer
    and data (judge included), and its stages in order."""
    rt: Runtime
    cfg: train.Config
    tok: object
    task: object
    stages: list


def load_run(d):
    """The run in directory d, its settings read back from its last checkpoint."""
    rows = read_json(os.path.join(d, "results.json"))
    if not rows:
        raise ValueError(f"{d}: no results.json, not a finished train.py run")
    stages = [r["stage"] for r in rows]
    saved = load_checkpoint(stage_path(d, stages[-1]))["config"]
    cfg = train.Config(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(train.Config)}})
    cfg = dataclasses.replace(inputs.resolve(cfg), device="cpu", dtype="float32", compile=False, fsdp=False)
    rt = setup(cfg.device, cfg.dtype, d)  # writes nothing: the analysis keeps no metrics log
    tok = inputs.tokenizer_for(cfg)
    return RunData(rt, cfg, tok, inputs.load_data(cfg, chat.load_template(tok), rt.device), stages)


def load_model(d, stage):
    return model_from_checkpoint(load_checkpoint(stage_path(d, stage))).eval()


# ---- the pipeline's own steps, called in one place each ------------------------------------

def sample(run, model, prompt_ids, temperature, seed=0):
    """Responses in token ids (EOS included when emitted), sampled as train.py samples."""
    return train.sample_responses(run.rt, run.cfg, run.tok, model, prompt_ids, temperature, seed)


def text(run, ids):
    """A response's text, without its EOS."""
    return run.tok.decode(ids[:-1] if ids and ids[-1] in run.tok.eos_ids else ids)


def judge(run, prompts, candidates):
    return run.rt.judge(run.task.judge, prompts, candidates, run.cfg.gen_batch_size)


def logps(run, model, rows):
    """Summed response log-probs of (prompt_ids, response_ids) rows: (N,)."""
    return run.rt.logps(model, rows, run.tok.pad_id, 4 * run.cfg.micro_batch_size)


class Pairs(NamedTuple):
    """A stage's training pairs on the first prompts of its chunk, all in token ids."""
    prompt_ids: list
    pairs: list    # (chosen, rejected), or None: a full tie, dropped
    answers: list  # per prompt, pi_ref's answers that joined the judged candidates ([]: offline DPO)


def trained_pairs(run, ref, c, n):
    """The pairs that the stage training on chunk c built for its first n prompts. Chunk 0 is
    offline DPO's fixed pairs. For a SELM iteration, pi_ref's answers are drawn by
    train.reference_answers with the iteration's own seed over whole sampling blocks (the
    seed of a block depends on its position, its samples on all its prompts): the answers
    the stage drew."""
    cfg, tok = run.cfg, run.tok
    blocks = run.task.chunks[c][:math.ceil(n / cfg.gen_batch_size) * cfg.gen_batch_size]
    chunk, block_ids = blocks[:n], [tok.encode_prompt(e["prompt"]) for e in blocks]
    prompts, prompt_ids = [e["prompt"] for e in chunk], block_ids[:n]
    chosen, rejected = [e["chosen"] for e in chunk], [e["rejected"] for e in chunk]
    chosen_ids, rejected_ids = [tok.encode_response(x) for x in chosen], [tok.encode_response(x) for x in rejected]
    if c == 0:
        return Pairs(prompt_ids, list(zip(chosen_ids, rejected_ids)), [[] for _ in chunk])
    # iteration t = c is stage number c + 1: the same draws as selm_iteration's
    answers = [a[:cfg.online_samples] for a in train.reference_answers(run.rt, cfg, tok, ref, block_ids, c + 1)[:n]]
    candidates = [candidates_of(Candidate.of_text(w, tok), [Candidate.of_ids(y, tok) for y in ys],
                                Candidate.of_text(l, tok), cfg.tie_order)
                  for w, ys, l in zip(chosen, answers, rejected)]
    scores = judge(run, prompts, [[x.text for x in cs] for cs in candidates])
    pairs = [pair and (pair[0].ids, pair[1].ids) for pair in pairs_from_scores(scores, candidates, order=cfg.tie_order)]
    return Pairs(prompt_ids, pairs, answers)


# ---- the measurements ---------------------------------------------------------------------

def exploration(run, model, prompts, k, seed):
    """k temperature-1 samples per prompt, judged: how varied and how good they are."""
    ids = [run.tok.encode_prompt(p) for p in prompts]
    samples = [text(run, y) for y in sample(run, model, [p for p in ids for _ in range(k)], 1.0, seed)]
    per = [samples[j * k:(j + 1) * k] for j in range(len(prompts))]
    scores = judge(run, prompts, per)
    return {"distinct": statistics.mean(len(set(ys)) for ys in per),
            "best_of_k": statistics.mean(max(s) for s in scores),
            "mean_of_k": statistics.mean(statistics.mean(s) for s in scores),
            "best_of_8": statistics.mean(max(s[:8]) for s in scores),
            "pass_at_k": statistics.mean(any(x >= 1.0 for x in s) for s in scores)}


def implicit_reward(run, model, ref, rows):
    """Mean beta * (log pi(y|x) - log pi_ref(y|x)) over (prompt_ids, response_ids) rows."""
    rows = [r for r in rows if r[1]]
    return run.cfg.beta * (logps(run, model, rows) - logps(run, ref, rows)).mean().item()


def implicit_rewards(run, model, ref, c, n, k, seed):
    """The implicit rewards of the chosen responses of the stage's pairs on chunk c, and of
    k fresh samples of the stage's model on those prompts."""
    prompt_ids, pairs, _ = trained_pairs(run, ref, c, n)
    fresh = sample(run, model, [p for p in prompt_ids for _ in range(k)], 1.0, seed)
    return {"r_chosen": implicit_reward(run, model, ref, [(p, pair[0]) for p, pair in zip(prompt_ids, pairs) if pair]),
            "r_samples": implicit_reward(run, model, ref, [(prompt_ids[j // k], y) for j, y in enumerate(fresh)])}


@torch.no_grad()
def analyse(d, k, n_diag, implicit=True):
    """The stages of the run in d, each written to analysis.json as soon as it is done: SFT
    and offline DPO for a run without iterations, else its SELM iterations (the layout of
    experiments.runner, where such a run starts from a base run's offline DPO)."""
    path = os.path.join(d, "analysis.json")
    out = read_json(path, {})
    run = load_run(d)
    stages = run.stages
    own = stages if run.cfg.iterations == 0 else stages[2:]
    eval_prompts = [e["prompt"] for e in run.task.eval]
    online = {r["stage"]: r["online"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))
              if "online" in r and "stage" in r}
    for i, stage in enumerate(stages):
        if stage not in own or stage in out:
            continue
        t0 = time.time()
        model = load_model(d, stage)
        greedy = sample(run, model, [run.tok.encode_prompt(p) for p in eval_prompts], 0.0)
        row = {"answers": [text(run, y) for y in greedy], **exploration(run, model, eval_prompts[:n_diag], k, 1000 + i)}
        if i > 0 and implicit:  # stage i trained on chunk i - 1 against the previous stage
            row.update(implicit_rewards(run, model, load_model(d, stages[i - 1]), i - 1, n_diag, k, 2000 + i))
        if stage in online:
            row["y_ref_chosen"] = online[stage]["y_ref_chosen"]
        out[stage] = row
        write_json_atomic(out, path)
        print(f"analysed {stage} in {time.time() - t0:.1f}s: distinct {row['distinct']:.2f}, "
              f"best-of-{k} {row['best_of_k']:.3f}", flush=True)


def parser():
    ap = argparse.ArgumentParser(prog="python -m experiments.analyse", description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("dir", help="a train.py run directory (its checkpoints, results.json, metrics.jsonl)")
    ap.add_argument("--k", type=int, default=8, help="temperature-1 samples per prompt")
    ap.add_argument("--diag-prompts", type=int, default=128, help="prompts for the samples and implicit rewards")
    ap.add_argument("--no-implicit", action="store_true",
                    help="skip the implicit rewards (the study's report does not use them; they cost a second "
                         "round of sampling and scoring under two models)")
    return ap


def check_args(args):
    """Every argument checked, in one line naming it, before anything is read."""
    if not os.path.isdir(args.dir):
        raise ValueError(f"DIR {args.dir!r} is not a directory")
    for flag, n in (("--k", args.k), ("--diag-prompts", args.diag_prompts)):
        if n < 1:
            raise ValueError(f"{flag} must be at least 1, got {n}")


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        analyse(args.dir, args.k, args.diag_prompts, implicit=not args.no_implicit)


if __name__ == "__main__":
    main()
