"""
sweep.py -- the paper's comparison in miniature: offline DPO vs iterative DPO vs SELM.

    python -m experiments.sweep            # 2 difficulties x 3 seeds x {offline DPO, iterative DPO, SELM at 4 alphas}
    python -m experiments.sweep --quick    # 1 seed, 1 difficulty, 2 alphas
    python -m experiments.sweep --study    # the preregistered study instead (study.py, docs/preregistration.md)

For every difficulty and seed, one base run of train.py (SFT, then offline DPO on chunk 1,
`--iterations 0`) is the "offline DPO" method; every online method starts from its checkpoint
(`--start-from .../dpo/dpo.pt`) and differs only in alpha (0: iterative DPO). Runs go to
<out>/<difficulty>/seed<k>/<method>/ (method: dpo, idpo, selm_a<alpha>) as subprocesses,
`--jobs` at a time; a finished run is skipped, an interrupted one continues with `--resume`.
Unknown flags go to every train.py call (e.g. `--model tiny --sft-steps 100`).

Each run is then analysed once (analysis.json, resumable): greedy answers on the eval prompts
(for the head-to-head, the paper's Fig. 2) and exploration diagnostics (Figs. 4-5): k
temperature-1 samples per prompt -> distinct responses, best-of-k reward, pass@k; implicit
reward beta*log(pi/pi_ref) of fresh samples and of the chosen responses the stage trained on.
Tables (mean +- std over seeds) go to <out>/report.md and report.json, a PNG per difficulty
when matplotlib is installed.
"""

import argparse
import glob
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch

import data
import sorting
import inputs
from experiments import plots
import tokenizer
import train
from checkpoint import load_checkpoint, model_from_checkpoint, stage_names, write_json_atomic
from runtime import read_metrics
from sample import generate
from selm import candidates_of, pairs_from_scores, reference_logps, win

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py, the chapters
# alpha*beta = 0.002 .. 0.16 at beta 2: from "no measurable effect" to "clearly too optimistic"
# on the built-in task (see the README's sweep section); the paper searched 0.0001 .. 0.005
# at beta 0.01.
ALPHAS = [0.001, 0.005, 0.02, 0.08]
QUICK_ALPHAS = [0.001, 0.08]


# ---- the grid ----------------------------------------------------------------------------

def difficulty_range(name):
    """"len7-10" -> (7, 10): the word lengths of the built-in task."""
    m = re.fullmatch(r"len(\d+)-(\d+)", name)
    if not m:
        raise ValueError(f"difficulty {name!r} is not of the form len<min>-<max>")
    return int(m.group(1)), int(m.group(2))


def method_name(alpha):
    return "idpo" if alpha == 0 else f"selm_a{alpha:g}"


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class Run:
    """One train.py run plus its analysis. `base` is the run it starts from (None = it is the
    base: SFT + offline DPO)."""

    def __init__(self, out, difficulty, seed, alpha, iterations, base=None):
        self.difficulty, self.seed, self.alpha, self.base = difficulty, seed, alpha, base
        self.method = "dpo" if base is None else method_name(alpha)
        self.dir = os.path.join(out, difficulty, f"seed{seed}", self.method)
        self.iterations = 0 if base is None else iterations
        self.stages = stage_names(self.iterations)
        self.name = f"{difficulty}/seed{seed}/{self.method}"

    def trained(self):
        rows = read_json(os.path.join(self.dir, "results.json"), [])
        return [r["stage"] for r in rows] == self.stages

    def own_stages(self):  # the stages this run analyses (the base's are shared)
        return self.stages if self.base is None else self.stages[2:]

    def analysed(self):
        return set(self.own_stages()) <= set(read_json(os.path.join(self.dir, "analysis.json"), {}))

    def complete(self):
        return self.trained() and self.analysed()

    def commands(self, args, extra):
        cmds = []
        if not self.trained():
            lo, hi = difficulty_range(self.difficulty)
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--seed", str(self.seed),
                   "--min-len", str(lo), "--max-len", str(hi), "--iterations", str(self.iterations),
                   "--out-dir", self.dir] + extra
            if self.base is not None:
                cmd += ["--alpha", f"{self.alpha:g}"]
            if any(f.endswith(".pt") for f in os.listdir(self.dir)):
                cmd += ["--resume"]  # interrupted: continue after its last checkpoint
            elif self.base is not None:
                cmd += ["--start-from", os.path.join(self.base.dir, "dpo.pt")]
            cmds.append(cmd)
        cmds.append([sys.executable, "-m", "experiments.sweep", "--analyse", self.dir,
                     "--k", str(args.k), "--diag-prompts", str(args.diag_prompts)])
        return cmds


def make_grid(args):
    runs = []
    for d in args.difficulties:
        for s in args.seeds:
            base = Run(args.out, d, s, 0.0, args.iterations)
            runs.append(base)
            if not args.bases_only:
                runs += [Run(args.out, d, s, a, args.iterations, base) for a in [0.0] + args.alphas]
    return runs


# ---- running: a small process pool with dependencies, resume and an ETA ---------------------

def live_lock(path):
    """True if the lock file names a live process: a run that some sweep.py is running now."""
    try:
        with open(path) as f:
            os.kill(int(f.read()), 0)
        return True
    except (OSError, ValueError):
        return False


def busy(out):
    """Runs in progress under `out`, by any sweep.py: several invocations (say, one per
    difficulty) may share one --out, and --jobs then bounds them together."""
    return sum(map(live_lock, glob.glob(os.path.join(out, "*", "seed*", "*", "sweep.lock"))))


def run_all(runs, args, extra):
    t0 = time.time()
    todo = []
    for r in runs:
        if r.complete():
            print(f"skipped {r.name} (complete)", flush=True)
        else:
            todo.append(r)
    guess = {"base": 300.0, "method": 120.0}  # seconds per run until measured (small, 2 cores)
    took = {"base": [], "method": []}

    def est(r):
        kind = "base" if r.base is None else "method"
        return statistics.mean(took[kind]) if took[kind] else guess[kind]

    running, failed, n_done, total = {}, set(), 0, len(todo)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    while todo or running:
        reaped = False
        for r, (proc, start, log) in list(running.items()):
            if proc.poll() is None:
                continue
            reaped = True
            del running[r]
            log.close()
            os.remove(os.path.join(r.dir, "sweep.lock"))
            n_done += 1
            dt = time.time() - start
            if proc.returncode != 0:
                failed.add(r.name)
                print(f"[{n_done}/{total}] FAILED {r.name} (exit {proc.returncode}), see {r.dir}/sweep.log", flush=True)
                continue
            took["base" if r.base is None else "method"].append(dt)
            left = sum(map(est, todo)) + sum(max(0.0, est(x) - (time.time() - s)) for x, (_, s, _) in running.items())
            row = read_json(os.path.join(r.dir, "results.json"))[-1]
            print(f"[{n_done}/{total}] {r.name:<34} {dt:5.0f}s  reward {row['reward']:.3f}  "
                  f"win vs ref {row['win_rate_vs_reference']:.3f}   elapsed {(time.time() - t0) / 60:5.1f} min, "
                  f"ETA {left / max(1, args.jobs) / 60:5.1f} min", flush=True)
        if reaped:  # let other invocations sharing --out see the free slot too, in random order
            time.sleep(random.uniform(0.0, 1.0))
        for r in list(todo):
            if len(running) >= args.jobs or busy(args.out) >= args.jobs:
                break
            if r.base is not None and r.base.name in failed:
                todo.remove(r)
                failed.add(r.name)
                n_done += 1
                print(f"[{n_done}/{total}] SKIPPED {r.name}: its base run failed", flush=True)
                continue
            if live_lock(os.path.join(r.dir, "sweep.lock")) or (r.base is not None and (r.base in running or not r.base.trained())):
                continue  # another invocation has it, or it waits for the shared SFT + offline DPO
            if r.complete():  # finished by another invocation meanwhile
                todo.remove(r)
                n_done += 1
                print(f"[{n_done}/{total}] {r.name} was completed by another sweep.py", flush=True)
                continue
            todo.remove(r)
            os.makedirs(r.dir, exist_ok=True)
            log = open(os.path.join(r.dir, "sweep.log"), "a")
            script = " && ".join(shlex.join(c) for c in r.commands(args, extra))
            log.write(f"$ {script}\n")
            log.flush()
            proc = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            with open(os.path.join(r.dir, "sweep.lock"), "w") as f:
                f.write(str(proc.pid))
            running[r] = (proc, time.time(), log)
        time.sleep(0.5)
    print(f"runs finished in {(time.time() - t0) / 60:.1f} min ({len(failed)} failed)", flush=True)
    return failed


# ---- analysis of one run (a subprocess: `python -m experiments.sweep --analyse DIR`) ---------------------------

def load_model(d, stage):
    return model_from_checkpoint(load_checkpoint(os.path.join(d, f"{stage}.pt"))).eval()


def responses(tok, model, prompt_ids, max_new, temperature, seed=None):
    """Responses as (token ids with EOS when finished, text), batched by 256 prompts."""
    out = []
    for i in range(0, len(prompt_ids), 256):
        r, _ = generate(model, prompt_ids[i:i + 256], max_new, temperature=temperature,
                        eos_id=tok.eos_id, pad_id=tok.pad_id, seed=None if seed is None else seed + i)
        out += r
    return [(ids, tok.decode([t for t in ids if t != tok.eos_id])) for ids in out]


def logps(model, rows, pad_id, batch_size=128):
    """Summed response log-probs of (prompt_ids, response_ids) rows, no grad: (N,)."""
    return reference_logps(model, (data.collate(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)))


def implicit_reward(beta, model, ref, rows, pad_id):
    """Mean beta * (log pi(y|x) - log pi_ref(y|x)) over (prompt_ids, response_ids) rows."""
    rows = [r for r in rows if r[1]]
    return beta * (logps(model, rows, pad_id) - logps(ref, rows, pad_id)).mean().item()


@torch.no_grad()
def analyse(d, k, n_diag, implicit=True):
    """Per stage of the run in d: greedy answers to the eval prompts, k temperature-1 samples
    on the first n_diag of them (distinct, best and mean reward, best of the first 8, pass@k:
    any sample exactly right), and with `implicit` the implicit rewards of fresh samples and of
    the stage's chosen responses (only for greedy single-y_ref runs, whose pairs it rebuilds)."""
    path = os.path.join(d, "analysis.json")
    out = read_json(path, {})
    stages = [r["stage"] for r in read_json(os.path.join(d, "results.json"))]
    cfg = load_checkpoint(os.path.join(d, f"{stages[-1]}.pt"))["config"]
    own = stages if cfg["iterations"] == 0 else stages[2:]
    tok = tokenizer.get_tokenizer(verbose=False)
    task = inputs.load_data(train.Config(**{k: v for k, v in cfg.items() if k in train.Config.__dataclass_fields__}))
    implicit = implicit and cfg.get("y_ref", "greedy") == "greedy" and cfg.get("online_samples", 1) == 1
    beta, max_new = cfg["beta"], cfg["max_new_tokens"]
    eval_prompts = [e["prompt"] for e in task.eval]
    eval_ids = [tok.encode(p) for p in eval_prompts]
    # the online loop's own log: share of pairs whose chosen was y_ref
    online = {r["stage"]: r["online"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))
              if "online" in r and "stage" in r}
    for i, stage in enumerate(stages):
        if stage not in own or stage in out:
            continue
        t0 = time.time()
        model = load_model(d, stage)
        row = {"answers": [a for _, a in responses(tok, model, eval_ids, max_new, 0)]}
        # exploration on held-out prompts: k temperature-1 samples each
        sub = eval_prompts[:n_diag]
        samples = responses(tok, model, [tok.encode(p) for p in sub for _ in range(k)], max_new, 1.0, seed=1000 + i)
        per = [[samples[j * k + m][1] for m in range(k)] for j in range(len(sub))]
        scores = [sorting.judge(p, ys) for p, ys in zip(sub, per)]
        row["distinct"] = statistics.mean(len(set(ys)) for ys in per)
        row["best_of_k"] = statistics.mean(max(s) for s in scores)
        row["mean_of_k"] = statistics.mean(statistics.mean(s) for s in scores)
        row["best_of_8"] = statistics.mean(max(s[:8]) for s in scores)
        row["pass_at_k"] = statistics.mean(any(x >= 1.0 for x in s) for s in scores)
        if i > 0 and implicit:  # implicit rewards against this stage's reference, the previous stage
            ref = load_model(d, stages[i - 1])
            chunk = task.chunks[i - 1][:n_diag]  # the prompts this stage trained on
            cp = [e["prompt"] for e in chunk]
            cids = [tok.encode(p) for p in cp]
            if stage == "dpo":
                chosen = [e["chosen"] for e in chunk]
            else:  # rebuild the iteration's pairs: greedy y_ref from pi_ref, judge the three
                y_ref = [a for _, a in responses(tok, ref, cids, max_new, 0)]
                ch, rj = [e["chosen"] for e in chunk], [e["rejected"] for e in chunk]
                scores = [sorting.judge(p, candidates_of(w, [r], l)) for p, w, r, l in zip(cp, ch, y_ref, rj)]
                pairs = pairs_from_scores(scores, ch, rj, [[r] for r in y_ref])
                chosen = [None if p is None else p[0] for p in pairs]
            rows = [(c, tok.encode(y) + [tok.eos_id]) for c, y in zip(cids, chosen) if y is not None]
            fresh = responses(tok, model, [c for c in cids for _ in range(k)], max_new, 1.0, seed=2000 + i)
            row["r_chosen"] = implicit_reward(beta, model, ref, rows, tok.pad_id)
            row["r_samples"] = implicit_reward(beta, model, ref, [(cids[j // k], y) for j, (y, _) in enumerate(fresh)], tok.pad_id)
        if stage in online:
            row["y_ref_chosen"] = online[stage]["y_ref_chosen"]
        out[stage] = row
        write_json_atomic(out, path)
        print(f"analysed {stage} in {time.time() - t0:.1f}s: distinct {row['distinct']:.2f}, "
              f"best-of-{k} {row['best_of_k']:.3f}", flush=True)


# ---- the report ------------------------------------------------------------------------

def ms(xs, fmt="{:.3f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = fmt.replace("+", "").format(statistics.stdev(xs)) if len(xs) > 1 else None
    return fmt.format(statistics.mean(xs)) + (f" ± {sd}" if sd else "")


def h2h(judge_prompts, a, b):
    """Win rate of answers a over answers b (ties half), judged per prompt."""
    return sum(win(*sorting.judge(p, [x, y])) for p, x, y in zip(judge_prompts, a, b)) / len(judge_prompts)


def report(runs, args):
    """Table 1, the head-to-head (Fig. 2) and the diagnostics (Figs. 4-5), per difficulty."""
    T = args.iterations
    lines = [f"Seeds {', '.join(map(str, args.seeds))}; mean ± std over seeds; {args.k} samples per "
             f"prompt on {args.diag_prompts} prompts for the diagnostics.", ""]
    summary = {}
    for d in args.difficulties:
        by = {(r.seed, r.method): r for r in runs if r.difficulty == d and r.complete()}
        res = {key: {row["stage"]: row for row in read_json(os.path.join(r.dir, "results.json"))} for key, r in by.items()}
        ana = {key: read_json(os.path.join(r.dir, "analysis.json"), {}) for key, r in by.items()}
        methods = ["idpo"] + [method_name(a) for a in args.alphas]
        label = lambda m: "iterative DPO" if m == "idpo" else f"SELM α={m[6:]}"  # noqa: E731
        # (label, method dir holding the row, stage)
        rows = [("SFT", "dpo", "sft"), ("offline DPO", "dpo", "dpo")]
        rows += [(f"{label(m)}, iter {t}", m, f"selm_{t}") for m in methods for t in range(1, T + 1)]
        lo, hi = difficulty_range(d)
        lines += [f"## {d}: words of {lo}-{hi} letters", "",
                  "| method | n | win vs reference | win vs SFT | reward | fully correct | length | KL to SFT |",
                  "|---|---|---|---|---|---|---|---|"]
        summary[d] = {"table": {}, "head_to_head": {}, "diagnostics": {}}
        for name, m, st in rows:
            got = [res[(s, m)][st] for s in args.seeds if (s, m) in res and st in res[(s, m)]]
            cols = ["win_rate_vs_reference", "win_rate_vs_sft", "reward", "perfect", "length", "kl"]
            summary[d]["table"][name] = {c: [g[c] for g in got] for c in cols}
            lines.append(f"| {name} | {len(got)} | " + " | ".join(
                ms([g[c] for g in got], "{:.2f}" if c in ("length", "kl") else "{:.3f}") for c in cols) + " |")
        prompts = [e["prompt"] for e in sorting.make_task(seed=args.train.task_seed, n_sft=1, n_prompts_per_chunk=1,
                                                        n_chunks=1, n_eval=args.train.n_eval, min_len=lo, max_len=hi).eval]
        lines += ["", "Head-to-head, SELM vs iterative DPO on the same seed's eval prompts "
                  "(greedy; ties half; > 0.5 = SELM better); last column: paired reward difference at the last iteration.", "",
                  "| alpha | " + " | ".join(f"iter {t}" for t in range(1, T + 1)) + f" | Δ reward, iter {T} |",
                  "|---|" + "---|" * (T + 1)]
        for m in methods[1:]:
            cells, seeds_ok = [], [s for s in args.seeds if (s, m) in ana and (s, "idpo") in ana]
            for t in range(1, T + 1):
                st = f"selm_{t}"
                ws = [h2h(prompts, ana[(s, m)][st]["answers"], ana[(s, "idpo")][st]["answers"]) for s in seeds_ok]
                summary[d]["head_to_head"][f"{m}/{st}"] = ws
                cells.append(ms(ws))
            dr = [res[(s, m)][f"selm_{T}"]["reward"] - res[(s, "idpo")][f"selm_{T}"]["reward"] for s in seeds_ok]
            summary[d]["head_to_head"][f"{m}/delta_reward"] = dr
            lines.append(f"| {m[6:]} | " + " | ".join(cells) + f" | {ms(dr, '{:+.3f}')} |")
        lines += ["", f"Exploration: distinct responses among {args.k} temperature-1 samples, their best and mean "
                  "reward (held-out prompts); implicit reward β·log(π/π_ref) of fresh samples and of the chosen "
                  "responses of the stage's training pairs (π_ref = previous stage); share of pairs whose chosen "
                  "was the model's own greedy y_ref.", "",
                  f"| method | distinct of {args.k} | best-of-{args.k} | mean of {args.k} | r(samples) | r(chosen) | y_ref chosen |",
                  "|---|---|---|---|---|---|---|"]
        for name, m, st in rows:
            got = [ana[(s, m)][st] for s in args.seeds if (s, m) in ana and st in ana[(s, m)]]
            cols = ["distinct", "best_of_k", "mean_of_k", "r_samples", "r_chosen", "y_ref_chosen"]
            summary[d]["diagnostics"][name] = {c: [g.get(c) for g in got] for c in cols}
            lines.append(f"| {name} | " + " | ".join(
                ms([g.get(c) for g in got], "{:.2f}" if c.startswith(("r_", "dist")) else "{:.3f}") for c in cols) + " |")
        lines.append("")
        plots.sweep_curves(d, summary[d]["table"], methods, label, T, os.path.join(args.out, f"{d}.png"))
    path = args.report or os.path.join(args.out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    write_json_atomic(summary, os.path.splitext(path)[0] + ".json")
    print("\n".join(lines))
    print(f"wrote {path}")


# ---- command line ----------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--quick", action="store_true", help="one seed, one difficulty, two alphas")
    ap.add_argument("--out", default=None, help="output root (default out/sweep, or out/sweep-quick)")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2)")
    ap.add_argument("--difficulties", default=None, help="comma-separated len<min>-<max> (default len7-10,len11-14)")
    ap.add_argument("--alphas", default=None, help="comma-separated SELM alphas (iterative DPO, alpha 0, always runs)")
    ap.add_argument("--iterations", type=int, default=3, help="SELM iterations T")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each one single-threaded)")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt for the diagnostics")
    ap.add_argument("--diag-prompts", type=int, default=128, help="prompts for the diagnostics")
    ap.add_argument("--report", default=None, help="report path (default <out>/report.md)")
    ap.add_argument("--bases-only", action="store_true", help="only the shared SFT + offline DPO runs")
    ap.add_argument("--report-only", action="store_true", help="tabulate what is there, run nothing")
    ap.add_argument("--study", action="store_true", help="the preregistered study (docs/preregistration.md, study.py) "
                                                          "instead of the alpha sweep")
    ap.add_argument("--analyse", default=None, help=argparse.SUPPRESS)  # internal: analyse one run dir
    ap.add_argument("--no-implicit", action="store_true", help=argparse.SUPPRESS)  # internal: skip implicit rewards
    args, extra = ap.parse_known_args(argv)
    if args.analyse:
        return analyse(args.analyse, args.k, args.diag_prompts, implicit=not args.no_implicit)
    if args.study:
        from experiments import study
        return study.main(args, extra)
    args.out = args.out or ("out/sweep-quick" if args.quick else "out/sweep")
    try:
        args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
        args.difficulties = (args.difficulties or ("len7-10" if args.quick else "len7-10,len11-14")).split(",")
        args.alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else \
            (QUICK_ALPHAS if args.quick else ALPHAS)
        for d in args.difficulties:
            difficulty_range(d)
    except ValueError as e:
        ap.error(f"--seeds, --difficulties or --alphas: {e}")
    if min(args.alphas) < 0:
        ap.error(f"--alphas must be >= 0, got {min(args.alphas)}")
    args.alphas = [a for a in args.alphas if a > 0]
    args.train = inputs.resolve(train.parse_args(extra))  # the pass-through flags, checked here
    runs = make_grid(args)
    if args.report_only and not any(r.complete() for r in runs):
        ap.error(f"--report-only: no finished run under {args.out}")
    t0 = time.time()
    failed = set() if args.report_only else run_all(runs, args, extra)
    if not args.bases_only:
        report(runs, args)
    print(f"sweep wall time {(time.time() - t0) / 60:.1f} min")
    if failed:
        sys.exit(f"sweep.py: {len(failed)} runs failed: {', '.join(sorted(failed))}")


if __name__ == "__main__":
    main()
