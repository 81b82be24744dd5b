"""
sweep.py -- the paper's comparison in miniature: offline DPO vs iterative DPO vs SELM.

    python -m experiments.sweep            # 2 difficulties x 3 seeds x {offline DPO, iterative DPO, SELM at 4 alphas}
    python -m experiments.sweep --quick    # 1 seed, 1 difficulty, 2 alphas

For every difficulty and seed, one base run of train.py (SFT, then offline DPO on chunk 1,
`--iterations 0`) is the "offline DPO" method; every online method starts from its checkpoint
(`--start-from .../dpo/dpo.pt`) and differs only in alpha (0: iterative DPO). Runs go to
<out>/<difficulty>/seed<k>/<method>/ (method: dpo, idpo, selm_a<alpha>) as subprocesses,
`--jobs` at a time (runner.py); a finished run is skipped, an interrupted one continues with
`--resume`. Unknown flags go to every train.py call (e.g. `--model tiny --sft-steps 100`).

Each run is then analysed once (experiments.analyse: analysis.json, resumable): greedy answers
on the eval prompts (for the head-to-head, the paper's Fig. 2) and exploration diagnostics
(Figs. 4-5): k temperature-1 samples per prompt -> distinct responses, best-of-k reward,
pass@k; implicit reward beta*log(pi/pi_ref) of fresh samples and of the chosen responses the
stage trained on.
Tables (mean +- std over seeds) go to <out>/report.md and report.json, a PNG per difficulty
when matplotlib is installed.
"""

import math
import os
import re
import sys
import time

from commands import one_line_errors
from experiments import plots
from experiments.runner import Job, check_common, mean_sd, parser as experiment_parser, run_all
from files import atomic_write, write_json_atomic
from selm import win
from tasks import sorting

# alpha*beta = 0.002 .. 0.16 at beta 2: from "no measurable effect" to "clearly too optimistic"
# on the built-in task (see docs/results.md, the sweep); the paper searched 0.0001 .. 0.005
# at beta 0.01.
ALPHAS = [0.001, 0.005, 0.02, 0.08]
QUICK_ALPHAS = [0.001, 0.08]


# ---- the grid ----------------------------------------------------------------------------

def difficulty_range(name):
    """"len7-10" -> (7, 10): the word lengths of the built-in task."""
    m = re.fullmatch(r"len(\d+)-(\d+)", name)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"difficulty {name!r} is not of the form len<min>-<max>, 1 <= min <= max")
    return int(m.group(1)), int(m.group(2))


def method_name(alpha):
    return "idpo" if alpha == 0 else f"selm_a{alpha:g}"


class Run(Job):
    """One run of the grid: `base` is the run it starts from (None = it is the base: SFT +
    offline DPO)."""

    def __init__(self, out, difficulty, seed, alpha, iterations, base=None):
        self.difficulty, self.seed, self.alpha = difficulty, seed, alpha
        self.method = "dpo" if base is None else method_name(alpha)
        lo, hi = difficulty_range(difficulty)
        flags = ["--seed", str(seed), "--min-len", str(lo), "--max-len", str(hi)]
        flags += [] if base is None else ["--alpha", f"{alpha:g}"]
        super().__init__(out, f"{difficulty}/seed{seed}/{self.method}", flags, 0 if base is None else iterations, base)


def make_grid(args):
    runs = []
    for d in args.difficulties:
        for s in args.seeds:
            base = Run(args.out, d, s, 0.0, args.iterations)
            runs.append(base)
            if not args.bases_only:
                runs += [Run(args.out, d, s, a, args.iterations, base) for a in [0.0] + args.alphas]
    return runs


# ---- the report ------------------------------------------------------------------------

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
        res = {key: r.results() for key, r in by.items()}
        ana = {key: r.analysis() for key, r in by.items()}
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
                mean_sd([g[c] for g in got], "{:.2f}" if c in ("length", "kl") else "{:.3f}") for c in cols) + " |")
        task = sorting.make_task(seed=args.train.task_seed, n_sft=1, n_prompts_per_chunk=1, n_chunks=1,
                                 n_eval=args.train.n_eval, min_len=lo, max_len=hi)
        prompts = [e["prompt"] for e in task.eval]
        lines += ["", "Head-to-head, SELM vs iterative DPO on the same seed's eval prompts "
                  "(greedy; ties half; > 0.5 = SELM better); last column: paired reward difference at the last "
                  "iteration.", "",
                  "| alpha | " + " | ".join(f"iter {t}" for t in range(1, T + 1)) + f" | Δ reward, iter {T} |",
                  "|---|" + "---|" * (T + 1)]
        for m in methods[1:]:
            cells, seeds_ok = [], [s for s in args.seeds if (s, m) in ana and (s, "idpo") in ana]
            for t in range(1, T + 1):
                st = f"selm_{t}"
                ws = [h2h(prompts, ana[(s, m)][st]["answers"], ana[(s, "idpo")][st]["answers"]) for s in seeds_ok]
                summary[d]["head_to_head"][f"{m}/{st}"] = ws
                cells.append(mean_sd(ws))
            dr = [res[(s, m)][f"selm_{T}"]["reward"] - res[(s, "idpo")][f"selm_{T}"]["reward"] for s in seeds_ok]
            summary[d]["head_to_head"][f"{m}/delta_reward"] = dr
            lines.append(f"| {m[6:]} | " + " | ".join(cells) + f" | {mean_sd(dr, '{:+.3f}')} |")
        lines += ["", f"Exploration: distinct responses among {args.k} temperature-1 samples, their best and mean "
                  "reward (held-out prompts); implicit reward β·log(π/π_ref) of fresh samples and of the chosen "
                  "responses of the stage's training pairs (π_ref = previous stage); share of pairs whose chosen "
                  "was the model's own greedy y_ref.", "",
                  f"| method | distinct of {args.k} | best-of-{args.k} | mean of {args.k} | r(samples) | r(chosen) "
                  "| y_ref chosen |",
                  "|---|---|---|---|---|---|---|"]
        for name, m, st in rows:
            got = [ana[(s, m)][st] for s in args.seeds if (s, m) in ana and st in ana[(s, m)]]
            cols = ["distinct", "best_of_k", "mean_of_k", "r_samples", "r_chosen", "y_ref_chosen"]
            summary[d]["diagnostics"][name] = {c: [g.get(c) for g in got] for c in cols}
            fmts = ["{:.2f}" if c.startswith(("r_", "dist")) else "{:.3f}" for c in cols]
            cells = [mean_sd([g.get(c) for g in got], f) for c, f in zip(cols, fmts)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        plots.sweep_curves(d, summary[d]["table"], methods, label, T, os.path.join(args.out, f"{d}.png"))
    path = args.report or os.path.join(args.out, "report.md")
    atomic_write(path, lambda f: f.write("\n".join(lines)), binary=False)
    write_json_atomic(summary, os.path.splitext(path)[0] + ".json")
    print("\n".join(lines))
    print(f"wrote {path}")


# ---- command line ----------------------------------------------------------------------

def parser():
    ap = experiment_parser("sweep", __doc__, "one seed, one difficulty, two alphas")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2)")
    ap.add_argument("--difficulties", default=None, help="comma-separated len<min>-<max> (default len7-10,len11-14)")
    ap.add_argument("--alphas", default=None, help="comma-separated SELM alphas (iterative DPO, alpha 0, always runs)")
    ap.add_argument("--iterations", type=int, default=3, help="SELM iterations T")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt for the diagnostics")
    ap.add_argument("--diag-prompts", type=int, default=128, help="prompts for the diagnostics")
    ap.add_argument("--report", default=None, help="report path (default <out>/report.md)")
    ap.add_argument("--bases-only", action="store_true", help="only the shared SFT + offline DPO runs")
    return ap


def check_args(args, extra):
    """Every flag checked, in one line naming it, before anything runs: sweep.py's own (the
    lists parsed in place), then --jobs, --out and the train.py flags (runner.check_common)."""
    for flag, n in (("--iterations", args.iterations), ("--k", args.k), ("--diag-prompts", args.diag_prompts)):
        if n < 1:
            raise ValueError(f"{flag} must be at least 1, got {n}")
    if args.report == "" or args.report is not None and os.path.isdir(args.report):
        raise ValueError(f"--report {args.report!r} is not a file name")
    seeds = args.seeds if args.seeds is not None else "0" if args.quick else "0,1,2"
    args.seeds = listed("--seeds", seeds, int, lambda s: 0 <= s < 2 ** 32, "integers in [0, 2**32)")
    grid = args.difficulties if args.difficulties is not None else "len7-10" if args.quick else "len7-10,len11-14"
    args.difficulties = listed("--difficulties", grid, str, difficulty_range, "len<min>-<max>, 1 <= min <= max")
    args.alphas = (QUICK_ALPHAS if args.quick else ALPHAS) if args.alphas is None else \
        listed("--alphas", args.alphas, float, lambda a: 0 <= a < math.inf, "numbers >= 0 (finite)")
    args.train = check_common(args, extra, "sweep")


def listed(flag, text, kind, ok, want):
    """The comma-separated values of a flag, each of `kind` and ok(); else a ValueError."""
    try:
        values = [kind(x) for x in text.split(",")]
        if text and all(map(ok, values)):
            return values
    except ValueError:
        pass
    raise ValueError(f"{flag} must be comma-separated {want}, got {text!r}")


def main(argv=None):
    ap = parser()
    args, extra = ap.parse_known_args(argv)  # the unknown flags go to every train.py run
    with one_line_errors(ap.prog):
        check_args(args, extra)
        sweep(args, extra)


def sweep(args, extra):
    """The grid's runs not yet complete, then the report. extra: train.py flags for every run."""
    args.alphas = [a for a in args.alphas if a > 0]
    runs = make_grid(args)
    if args.report_only and not any(r.complete() for r in runs):
        raise ValueError(f"--report-only: no finished run under {args.out}")
    t0 = time.time()
    failed = set() if args.report_only else \
        run_all(runs, args.out, args.jobs, extra, ["--k", str(args.k), "--diag-prompts", str(args.diag_prompts)])
    if not args.bases_only:
        report(runs, args)
    print(f"sweep wall time {(time.time() - t0) / 60:.1f} min")
    if failed:
        sys.exit(f"sweep.py: {len(failed)} runs failed: {', '.join(sorted(failed))}")


if __name__ == "__main__":
    main()
