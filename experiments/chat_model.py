"""
chat_model.py -- the paper's comparison on a real chat model (docs/instructions-plan.md), on
`train.py --task instructions`: offline DPO at the same compute (each iteration on its chunk's
offline pairs alone), iterative DPO, and SELM with its tuned alpha.

    python -m experiments.chat_model --init-from models/SmolLM2-135M-Instruct   # hours on 2 cores
    python -m experiments.chat_model --init-from DIR --quick                    # the machinery, minutes

Phases, in order; each decision goes to <out>/decisions.json once and is never revised, so the
command can be stopped and started again at any point:
  1. pairs       the offline pairs of each task seed, made once (the starting model's answers
                 do not depend on the training seed) and copied into every run's directory
  2. lr          offline DPO at each learning rate of the grid, on the tuning seed
  3. alpha       arm A and arm B at each alpha of the grid, on the tuning seed
  4. held out    per held-out seed, the shared offline DPO and the three arms from it
  5. report      <out>/report.md and report.json: every endpoint, the decision, a figure
Every run is a train.py process (runner.run_all: --jobs at a time, resumable).
"""

import json
import math
import os
import shutil
import statistics
import sys

import torch

import inputs
import train
from commands import one_line_errors
from constraints import Constraint, words
from experiments import plots
from experiments.runner import Job, check_experiment, mean_sd, parser as experiment_parser, read_json, run_all
from files import atomic_write, write_json_atomic
from pairs import PAIRS_FILE, own_pairs
from runtime import compute_dtype, setup
from tasks.instructions import (DEGENERATE, Request, degenerate, make_task, parse_prompt,
                                verdicts)

ARMS = {  # the preregistered arms: train.py flags besides the shared ones
    "O": ("offline DPO, same compute", ["--alpha", "0", "--online-samples", "0"]),
    "A": ("iterative DPO", ["--alpha", "0"]),
    "B": ("SELM", ["--alpha", "{alpha}"]),
}
COMPARISONS = (("A", "O"), ("B", "A"))  # each decided by the rule: does the loop pay, does the term
FULL = dict(flags=[], T=2, tuning=100, heldout=[0, 1, 2], lrs=[1e-5, 3e-5], alphas=[0.01, 0.03, 0.1])
QUICK = dict(flags=["--chunk-size", "8", "--n-eval", "8", "--max-new-tokens", "48"], T=1, tuning=100, heldout=[0, 1],
             lrs=[1e-5, 3e-5], alphas=[0.03, 0.3])
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided 95% t quantiles by degrees of freedom
DELTA = 0.03  # the equivalence margin, in prompt-level accuracy
SHORT = 12  # words: an answer this short is a headline, whatever the request asked for


class Run(Job):
    """A train.py run of the comparison: no analysis step (results.json holds every endpoint)."""

    def complete(self):
        return self.trained()

    def commands(self, extra, analyse_flags):
        return super().commands(extra, analyse_flags)[:-1] if not self.trained() else []


def shared(args, P, task_seed, seed):
    return ["--init-from", args.init_from, "--task", "instructions", "--task-seed", str(task_seed),
            "--seed", str(seed), *P["flags"]]


def make_pairs(args, P, task_seed):
    """The offline pairs of task seed `task_seed` for T iterations, made once in this process
    by the pipeline's own step (pairs.own_pairs) in <out>/pairs-<task_seed>/."""
    out = os.path.join(args.out, f"pairs-{task_seed}")
    path = os.path.join(out, PAIRS_FILE)
    if not os.path.isfile(path):
        cfg = train.parse_args(shared(args, P, task_seed, 0) + ["--iterations", str(P["T"]), "--out-dir", out])
        inputs.check_config(cfg)
        os.makedirs(out, exist_ok=True)
        rt = setup(cfg.device, cfg.dtype, out)
        tok, task_data = inputs.tokenizer_and_data(cfg, rt)
        model = inputs.build_model(cfg, tok, rt)
        rt.fit_dtype(cfg.dtype, model)  # as train.run settles it: the pairs its runs would make
        own_pairs(rt, cfg, tok, model, task_data)
        print(f"made the offline pairs of task seed {task_seed} in {path}", flush=True)
    return path


def launch(args, P, jobs, pairs):
    """Run the jobs, each with its task seed's pairs file in its directory beforehand."""
    for j in jobs:
        os.makedirs(j.dir, exist_ok=True)
        if not os.path.exists(os.path.join(j.dir, PAIRS_FILE)):
            shutil.copyfile(pairs, os.path.join(j.dir, PAIRS_FILE))
    failed = run_all(list({j.name: j for j in jobs}.values()), args.out, args.jobs, [], [])
    if failed:
        sys.exit(f"experiments.chat_model: {len(failed)} runs failed: {', '.join(sorted(failed))}")


def base_job(args, P, seed, task_seed, lr):
    return Run(args.out, f"lr{lr:g}/seed{seed}/base", shared(args, P, task_seed, seed) + ["--lr", f"{lr:g}"], 0)


def arm_job(args, P, base, arm, alpha, tag=""):
    flags = base.flags + [f.format(alpha=f"{alpha:g}") for f in ARMS[arm][1]]
    return Run(args.out, os.path.dirname(base.name) + f"/{arm}{tag}", flags, P["T"], base)


# ---- the phases --------------------------------------------------------------------------------

def tune(args, P, decisions, path):
    pairs = make_pairs(args, P, P["tuning"])
    if "lr" not in decisions:
        bases = {lr: base_job(args, P, P["tuning"], P["tuning"], lr) for lr in P["lrs"]}
        launch(args, P, bases.values(), pairs)
        scores = {f"{lr:g}": b.final() for lr, b in bases.items()}
        best = max(scores.values())
        decisions["lr_grid"] = scores  # the smallest lr within 0.01 of the best
        decisions["lr"] = min(lr for lr in P["lrs"] if scores[f"{lr:g}"] >= best - 0.01)
        write_json_atomic(decisions, path)
    if "alpha" not in decisions:
        base = base_job(args, P, P["tuning"], P["tuning"], decisions["lr"])
        jobs = [arm_job(args, P, base, "A", 0)] + [arm_job(args, P, base, "B", a, f"-a{a:g}") for a in P["alphas"]]
        launch(args, P, jobs, pairs)
        scores = {f"{a:g}": j.final() for a, j in zip(P["alphas"], jobs[1:])}
        best = max(scores.values())
        decisions.update(alpha_grid=scores, alpha_A=jobs[0].final(),
                         alpha=min(a for a in P["alphas"] if scores[f"{a:g}"] >= best - 0.01))
        write_json_atomic(decisions, path)


def held_out(args, P, decisions):
    pairs = make_pairs(args, P, 0)
    bases = {seed: base_job(args, P, seed, 0, decisions["lr"]) for seed in P["heldout"]}
    runs = {seed: {arm: arm_job(args, P, base, arm, decisions["alpha"]) for arm in ARMS}
            for seed, base in bases.items()}
    # the bases too: the runner starts an arm only once its base is trained, and runs only what it is given
    launch(args, P, [*bases.values(), *(j for arms in runs.values() for j in arms.values())], pairs)
    return runs


# ---- the report --------------------------------------------------------------------------------

def interval(xs):
    m = statistics.mean(xs)
    half = T95[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.inf
    return m, m - half, m + half


def decide(lo, hi):
    if lo > 0:
        return "helps"
    if hi < 0:
        return "hurts"
    return "equivalent" if -DELTA <= lo and hi <= DELTA else "inconclusive"


def sign_test(wins, losses):
    """Exact two-sided p-value of `wins` against `losses` under a fair coin (McNemar's exact test)."""
    n, k = wins + losses, min(wins, losses)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def answers(job, stage):
    """The stage's greedy answers to the held-out prompts, as its evaluation logged them (in
    the job's base run for the stages it shares: the starting model, offline DPO)."""
    for line in open(os.path.join(job.dir, "metrics.jsonl")):
        row = json.loads(line)
        if row.get("eval", {}).get("stage") == stage:
            return row["answers"]
    if job.base is not None:
        return answers(job.base, stage)
    raise ValueError(f"{job.dir}/metrics.jsonl has no evaluation of {stage}")


def cut_share(job, t):
    """The share of iteration t's prompts whose y_ref was cut off at --max-new-tokens."""
    for line in open(os.path.join(job.dir, "metrics.jsonl")):
        row = json.loads(line)
        if row.get("stage") == f"selm_{t}" and "online" in row:
            o = row["online"]
            return o["y_ref_truncated"] / max(1, o["pairs"] + o["dropped_ties"])
    raise ValueError(f"{job.dir}/metrics.jsonl has no online record of selm_{t}")


def met(job, stage, prompts):
    """Per held-out prompt, whether the stage's greedy answer met every constraint."""
    return [all(verdicts(parse_prompt(p), a)) for p, a in zip(prompts, answers(job, stage), strict=True)]


def verdict(prompt, answer):
    """The judge's verdict on one answer, in words: a degenerate answer's reason, else each
    constraint met (yes) or not (no)."""
    request = parse_prompt(prompt)
    why = degenerate(request, answer)
    return f"0: {why}" if why else ", ".join(f"{c.name} {'yes' if v else 'no'}"
                                            for c, v in zip(request.constraints, verdicts(request, answer)))


def before_after(job, T, prompts, n=5, label="seed 0, arm B"):
    """The first n held-out prompts by position: the starting model's greedy answer and the
    job's last stage's, each with the judge's verdict (markdown lines)."""
    quote = lambda a: "`" + " ".join(a.split()).replace("`", "'") + "`"  # noqa: E731 -- one line, no markdown
    lines = ["", f"## Before and after: the first {n} held-out prompts by position ({label})", ""]
    for p, a, b in list(zip(prompts, answers(job, "sft"), answers(job, f"selm_{T}")))[:n]:
        lines += [f"> {p}", "", "| | answer | the judge |", "|---|---|---|",
                  f"| before | {quote(a)} | {verdict(p, a)} |", f"| after | {quote(b)} | {verdict(p, b)} |", ""]
    return lines


# Three requests written freely, not in the task's phrasing, each with the constraints a reader
# would check, as the judge's own checkers (a prompt that parse_prompt could not read)
FREE = [  # no topic: the off-topic check lists a topic's words, and a free request's topic has many names
    ("Could you write me a tiny poem about my cat sleeping in the sun? Keep it all lowercase please.",
     Request("a tiny poem", None, [Constraint("lowercase", ())])),
    ("I need a note for my neighbour saying sorry about the noise last night. Two or three sentences is plenty, "
     "and don't use any commas.",
     Request("a note", None, [Constraint("at_most_sentences", (3,)), Constraint("no_commas", ())])),
    ("Give me three quick tips for keeping houseplants alive, as a bulleted list with '* ' at the start of each "
     "line.", Request("tips", None, [Constraint("bullets", (3,))])),
]


def free_verdict(request, answer):
    why = degenerate(request, answer)
    return f"0: {why}" if why else ", ".join(f"{c.name} {'yes' if c.met(answer) else 'no'}"
                                            for c in request.constraints)


def free_prompts(job, T, device="cpu", label="seed 0, arm B"):
    """The starting model's greedy answer and the job's last stage's to each FREE request, in the
    chat template, judged by the checkers the request names (markdown lines)."""
    from hf import load_model
    from sampler import generate
    cfg = train.parse_args(job.flags)
    inputs.resolve(cfg)
    quote = lambda a: "`" + " ".join(a.split()).replace("`", "'") + "`"  # noqa: E731
    got = []
    for path in (cfg.init_from, os.path.join(job.dir, f"selm_{T}.pt")):
        m = load_model(path, device)
        dtype, _ = compute_dtype(torch.device(device), cfg.dtype, m.model.config.n_embd)
        ids = [m.encode(text) for text, _ in FREE]
        out, _ = generate(m.model, ids, cfg.max_new_tokens, 0.0, eos_id=m.tok.eos_ids, pad_id=m.tok.pad_id,
                          dtype=dtype)
        got.append([m.tok.decode([t for t in r if t not in m.tok.eos_ids]) for r in out])
    lines = ["", f"## Before and after: three requests written freely ({label})", "",
             "Each is judged by the checkers of the constraints it asks for, named by hand.", ""]
    for (text, request), a, b in zip(FREE, *got):
        lines += [f"> {text}", "", "| | answer | the checkers |", "|---|---|---|",
                  f"| before | {quote(a)} | {free_verdict(request, a)} |",
                  f"| after | {quote(b)} | {free_verdict(request, b)} |", ""]
    return lines


def answer_tables(runs, seeds, T, prompts):
    """What the answers look like, pooled over seeds and prompts: how many the judge calls
    degenerate (and why), their words, and each constraint type's share met, from the starting
    model to each arm's last stage -- where reward hacking would show."""
    cols = [("starting model", "A", "sft"), ("offline DPO", "A", "dpo")] + [(a, a, f"selm_{T}") for a in ARMS]
    requests = [parse_prompt(p) for p in prompts]
    got = {name: [(r, a) for s in seeds for r, a in zip(requests, answers(runs[s][arm], stage), strict=True)]
           for name, arm, stage in cols}
    lines = ["", "## What the answers look like (pooled over seeds and prompts)", "",
             "| | " + " | ".join(n for n, _, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for why in DEGENERATE:  # each answer under the first reason that applies
        lines.append(f"| {why} (scores 0) | " + " | ".join(
            str(sum(degenerate(r, a) == why for r, a in got[n])) for n, _, _ in cols) + " |")
    lines.append("| words per answer | " + " | ".join(
        f"{statistics.mean(len(words(a)) for _, a in got[n]):.1f}" for n, _, _ in cols) + " |")
    lines.append(f"| answers of under {SHORT} words | " + " | ".join(  # a one-line "letter" or "story"
        str(sum(0 < len(words(a)) < SHORT for _, a in got[n])) for n, _, _ in cols) + " |")
    lines += ["", "Each constraint type's share met (n: the constraint's occurrences over seeds):", "",
              "| constraint | n | " + " | ".join(n for n, _, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name in sorted({c.name for r in requests for c in r.constraints}):
        shares = []
        for n, _, _ in cols:
            hits = [v for r, a in got[n] for c, v in zip(r.constraints, verdicts(r, a)) if c.name == name]
            shares.append(f"{sum(hits) / len(hits):.2f}")
        lines.append(f"| {name} | {len(hits)} | " + " | ".join(shares) + " |")
    return lines


def report(args, P, decisions, runs):
    seeds, T = P["heldout"], P["T"]
    n_eval = train.parse_args(runs[seeds[0]]["A"].flags).n_eval  # the held-out prompts, as the runs drew them
    prompts = make_task(seed=0, n_prompts_per_chunk=1, n_chunks=1, n_eval=n_eval).eval
    keys = ["prompt_accuracy", "instruction_accuracy", "reward", "win_rate_vs_sft", "kl", "length"]
    res = {s: {a: runs[s][a].results() for a in ARMS} for s in seeds}
    lines = ["# SELM against its baselines on SmolLM2-135M-Instruct: results", "",
             f"Plan: docs/instructions-plan.md. Tuning (seed {P['tuning']}): "
             f"lr grid {json.dumps(decisions['lr_grid'])} -> lr {decisions['lr']:g}; "
             f"alpha grid {json.dumps(decisions['alpha_grid'])} (arm A: {decisions['alpha_A']:.3f}) "
             f"-> alpha {decisions['alpha']:g}. Held-out seeds {seeds}, T = {T}.", "",
             "## Every endpoint at the last stage (mean ± std over seeds)", "",
             "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    start = [res[s]["A"]["sft"] for s in seeds]
    lines.append("| starting model | " + " | ".join(mean_sd([r[k] for r in start]) for k in keys) + " |")
    offline = [res[s]["A"]["dpo"] for s in seeds]
    lines.append("| offline DPO | " + " | ".join(mean_sd([r[k] for r in offline]) for k in keys) + " |")
    for a, (name, _) in ARMS.items():
        rows = [res[s][a][f"selm_{T}"] for s in seeds]
        lines.append(f"| {a}: {name} | " + " | ".join(mean_sd([r[k] for r in rows]) for k in keys) + " |")
    lines += ["", "## Prompt-level accuracy per seed and stage", "",
              "| seed | starting model | offline DPO | "
              + " | ".join(f"{a}, iter {t}" for a in ARMS for t in range(1, T + 1))
              + " |", "|---|---|---|" + "---|" * (len(ARMS) * T)]
    for s in seeds:
        stages = [("A", "sft"), ("A", "dpo")] + [(a, f"selm_{t}") for a in ARMS for t in range(1, T + 1)]
        lines.append(f"| {s} | " + " | ".join(f"{res[s][a][st]['prompt_accuracy']:.3f}" for a, st in stages) + " |")
    summary = {"decisions": decisions, "comparisons": {}, "per_stage": {}}
    lines += ["", "## The comparisons: paired differences in prompt-level accuracy at the last stage", "",
              "| comparison | mean | 95% interval (t, 2 df) | decision | pooled: first only / second only | "
              "sign test p |", "|---|---|---|---|---|---|"]
    for x, y in COMPARISONS:
        diffs = [res[s][x][f"selm_{T}"]["prompt_accuracy"] - res[s][y][f"selm_{T}"]["prompt_accuracy"] for s in seeds]
        m, lo, hi = interval(diffs)
        pairs = [(p, q) for s in seeds for p, q in zip(met(runs[s][x], f"selm_{T}", prompts),
                                                      met(runs[s][y], f"selm_{T}", prompts))]
        wins, losses = sum(p and not q for p, q in pairs), sum(q and not p for p, q in pairs)
        verdict = decide(lo, hi)
        summary["comparisons"][f"{x} - {y}"] = {"diffs": diffs, "mean": m, "interval": [lo, hi], "decision": verdict,
                                                "pooled": [wins, losses], "p": sign_test(wins, losses)}
        lines.append(f"| {x} - {y} | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {verdict} | {wins} / {losses} | "
                     f"{sign_test(wins, losses):.3f} |")
    lines += ["", "## y_ref cut off at --max-new-tokens, per iteration (share of the chunk's prompts, per seed)", "",
              "| arm | " + " | ".join(f"iteration {t}" for t in range(1, T + 1)) + " |", "|---|" + "---|" * T]
    summary["y_ref_cut"] = {a: [[cut_share(runs[s][a], t) for s in seeds] for t in range(1, T + 1)]
                            for a in ARMS if a != "O"}
    for a, per_iteration in summary["y_ref_cut"].items():
        lines.append(f"| {a} | " + " | ".join(", ".join(f"{x:.2f}" for x in xs) for xs in per_iteration) + " |")
    recipe = [(res[s]["B"]["sft"]["prompt_accuracy"], res[s]["B"][f"selm_{T}"]["prompt_accuracy"]) for s in seeds]
    summary["recipe"] = recipe
    lines += ["", "The recipe (arm B) against the starting model, prompt-level accuracy per seed: "
              + ", ".join(f"seed {s}: {a:.3f} -> {b:.3f}" for s, (a, b) in zip(seeds, recipe)) + "."]
    lines += answer_tables(runs, seeds, T, prompts)
    lines += before_after(runs[seeds[0]]["B"], T, prompts)
    lines += free_prompts(runs[seeds[0]]["B"], T)
    for a in ARMS:
        summary["per_stage"][a] = [[res[s][a][st]["prompt_accuracy"] for s in seeds]
                                   for st in ["sft", "dpo"] + [f"selm_{t}" for t in range(1, T + 1)]]
    atomic_write(os.path.join(args.out, "report.md"), lambda f: f.write("\n".join(lines) + "\n"), binary=False)
    write_json_atomic(summary, os.path.join(args.out, "report.json"))
    plots.arms_by_stage(summary["per_stage"], {a: n for a, (n, _) in ARMS.items()}, T,
                        os.path.join(args.out, "prompt_accuracy.png"))
    print("\n".join(lines))


# ---- the command ------------------------------------------------------------------------------

def parser():
    ap = experiment_parser("chat_model", __doc__, "the machinery at toy sizes, in minutes")
    ap.add_argument("--init-from", required=True, help="the chat model's directory (python -m tools.gguf_to_hf)")
    return ap


def check_args(args):
    """Every flag checked, in one line naming it, before anything runs."""
    if not os.path.isfile(os.path.join(args.init_from, "config.json")):
        raise ValueError(f"--init-from {args.init_from!r} is not a Hugging Face model directory (no config.json)")
    check_experiment(args, "chat_model")


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        run_comparison(args)


def run_comparison(args):
    """Tuning and the held-out runs, each decision kept in decisions.json so that a rerun goes
    on from there; then the report."""
    P = QUICK if args.quick else FULL
    args.init_from = os.path.abspath(args.init_from)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decisions.json")
    decisions = read_json(path, {})
    if args.report_only and "alpha" not in decisions:
        raise ValueError(f"--report-only, but {path} holds no tuning yet")
    if not args.report_only:
        tune(args, P, decisions, path)
    runs = held_out(args, P, decisions) if not args.report_only else {
        s: {a: arm_job(args, P, base_job(args, P, s, 0, decisions["lr"]), a, decisions["alpha"]) for a in ARMS}
        for s in P["heldout"]}
    report(args, P, decisions, runs)


if __name__ == "__main__":
    main()
