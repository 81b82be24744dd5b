"""
study.py -- the preregistered study of SELM's mechanism (docs/preregistration.md).

    python -m experiments.study             # calibration, tuning, 5 held-out seeds, report (hours)
    python -m experiments.study --quick     # the same machinery at toy scale, in minutes

Where the theory says the optimism term can pay off -- good answers rare under greedy
decoding but within reach of sampling, pi_ref's own answers usually not the best, sampled
answers judged, the term averaged over samples of pi_ref -- does SELM beat iterative DPO?

Phases, run in order; each decision is written to <out>/decisions.json once and never
revised, so the command can be stopped and started again at any point:
  1. calibration   the first word-length range that meets the preregistered criteria
  2. tuning        beta and lr for the alpha = 0 arms, then alpha for each SELM arm
  3. held out      five seeds x (the shared SFT + offline DPO, five arms)
  4. report        tables, decisions against the rule, a figure (<out>/report.md, .json, .png)
Every run is a train.py process (runner.run_all: `--jobs` at a time, resumable) followed by
its analysis (experiments.analyse: pass@16, best-of-8, greedy answers for the head-to-head).
Unknown flags go to every train.py call.
"""

import json
import math
import os
import statistics
import sys

import inputs
import train
from checkpoint import load_checkpoint
from commands import one_line_errors
from experiments import plots
from experiments.runner import Job, check_common, mean_sd, parser as experiment_parser, run_all
from files import atomic_write, read_json, write_json_atomic
from runtime import read_metrics
from selm import win
from tasks.sorting import judge

ARMS = {  # the preregistered arms: train.py flags besides the shared ones (alpha is tuned for B, D)
    "A": ("iterative DPO, greedy", ["--alpha", "0"]),
    "B": ("SELM, greedy", ["--alpha", "{alpha_B}"]),
    "C": ("iterative DPO, sampled", ["--alpha", "0", "--y-ref", "sampled"]),
    "D": ("SELM, sampled, m = 4", ["--alpha", "{alpha_D}", "--y-ref", "sampled", "--optimism-samples", "4"]),
    "E": ("online DPO, 2 samples", ["--alpha", "0", "--y-ref", "sampled", "--online-samples", "2"]),
}
FULL = dict(model=["--model", "small"], T=6, chunk=512, tuning=[100, 101], tuning_task=100, heldout=[0, 1, 2, 3, 4],
            lengths=[(8, 11), (9, 12), (10, 13)], settings=[(2.0, 1e-4), (2.0, 5e-5), (0.5, 1e-4), (0.5, 3e-5)],
            alphas=[0.0005, 0.002, 0.008], k=16, diag=128)
QUICK = dict(model=["--model", "tiny", "--n-sft", "512", "--n-eval", "64", "--sft-steps", "100"], T=2, chunk=64,
             tuning=[100], tuning_task=100, heldout=[0, 1], lengths=[(8, 11), (9, 12)],
             settings=[(2.0, 1e-4), (0.5, 1e-4)], alphas=[0.002, 0.008], k=16, diag=16)
T_QUANTILE = {1: 25.452, 2: 6.205, 3: 4.177, 4: 3.495, 5: 3.163, 6: 2.969}  # t_{0.9875, df}: 97.5% two-sided
DELTA = 0.01  # the equivalence margin, in reward


def base_flags(P, seed, task_seed, lengths, beta, lr):
    return [*P["model"], "--log-every", "1", "--seed", str(seed), "--task-seed", str(task_seed),
            "--min-len", str(lengths[0]), "--max-len", str(lengths[1]), "--chunk-size", str(P["chunk"]),
            "--beta", f"{beta:g}", "--lr", f"{lr:g}"]


def jobs_for(out, P, seed, task_seed, lengths, beta, lr, arms, iterations, alphas=None, tag=""):
    """The base run (SFT + offline DPO) of one seed and setting, and the given arms from it."""
    flags = base_flags(P, seed, task_seed, lengths, beta, lr)
    where = f"len{lengths[0]}-{lengths[1]}/b{beta:g}-lr{lr:g}/seed{seed}"
    base = Job(out, f"{where}/base", flags, 0)
    arms_ = [Job(out, f"{where}/{arm}{tag}", flags + [f.format(**(alphas or {})) for f in ARMS[arm[0]][1]],
                 iterations, base) for arm in arms]
    return base, arms_


# ---- the phases -------------------------------------------------------------------------------

def calibrate(out, P, run, decisions):
    """Preregistration, "Task calibration": the first length range meeting all three criteria."""
    stats = decisions.setdefault("calibration", {})
    for lengths in P["lengths"]:
        key = f"len{lengths[0]}-{lengths[1]}"
        if key not in stats:
            jobs = [j for s in P["tuning"] for b, arms in [jobs_for(out, P, s, P["tuning_task"], lengths, 2.0, 1e-4,
                                                                     ["C1"], 1)] for j in (b, *arms)]
            run(jobs)
            bases, c1 = jobs[0::2], jobs[1::2]
            stats[key] = {
                "exact_match": statistics.mean(b.final("perfect") for b in bases),
                "pass_at_16": statistics.mean(b.analysis()["dpo"]["pass_at_k"] for b in bases),
                "strictly_better": statistics.mean(better_share(j, "selm_1") for j in c1)}
        if choose(stats, P["lengths"])[1] is False:
            break  # this candidate meets every criterion: the later ones are never run
    return choose(stats, P["lengths"])


def choose(stats, candidates):
    """The calibration rule on the statistics gathered so far: (the first candidate meeting
    all three criteria, False), or, when none does, (the one failing the fewest, ties broken
    by the exact-match rate closest to 5%, True: a deviation)."""
    for s in stats.values():
        s["meets"] = [0.02 <= s["exact_match"] <= 0.10, s["pass_at_16"] >= 0.25, s["strictly_better"] <= 0.30]
    for lo, hi in candidates:
        if f"len{lo}-{hi}" in stats and all(stats[f"len{lo}-{hi}"]["meets"]):
            return (lo, hi), False
    fewest = min(stats, key=lambda k: (stats[k]["meets"].count(False),
                                       abs(math.log(max(stats[k]["exact_match"], 1e-4) / 0.05))))
    return tuple(int(x) for x in fewest[3:].split("-")), True


def better_share(job, stage):
    """The share of an iteration's prompts where pi_ref's best answer beat the offline chosen."""
    o = next(r["online"] for r in read_metrics(os.path.join(job.dir, "metrics.jsonl"))
             if r.get("stage") == stage and "online" in r and "eval" not in r)
    return o["y_ref_better"] / max(1, o["pairs"] + o["dropped_ties"])


def tune(out, P, run, lengths):
    """Preregistration, "Tuning protocol": beta and lr on arms A and C, then alpha per SELM arm.
    Each step's runs go to the pool together, so that both cores stay busy."""
    runs = {(beta, lr): [jobs_for(out, P, s, P["tuning_task"], lengths, beta, lr, ["A", "C"], P["T"])
                         for s in P["tuning"]] for beta, lr in P["settings"]}
    run([j for jobs in runs.values() for b, arms in jobs for j in (b, *arms)])
    grid = {f"{beta:g},{lr:g}": statistics.mean(j.final() for _, arms in jobs for j in arms)
            for (beta, lr), jobs in runs.items()}
    beta, lr = (float(x) for x in max(grid, key=grid.get).split(","))
    runs = {(arm, a): [jobs_for(out, P, s, P["tuning_task"], lengths, beta, lr, [arm], P["T"], {f"alpha_{arm}": a},
                                tag=f"-a{a:g}") for s in P["tuning"]] for arm in ("B", "D") for a in P["alphas"]}
    run([j for jobs in runs.values() for b, arms in jobs for j in (b, *arms)])
    alphas, alpha_grid = {}, {}
    for arm in ("B", "D"):
        scores = {f"{a:g}": statistics.mean(j.final() for _, arms in runs[(arm, a)] for j in arms) for a in P["alphas"]}
        best = max(scores.values())
        alphas[f"alpha_{arm}"] = min(float(a) for a, v in scores.items() if v >= best - 0.002)  # ties: the smaller
        alpha_grid[arm] = scores
    return {"beta": beta, "lr": lr, "beta_lr_grid": grid, **alphas, "alpha_grid": alpha_grid}


def held_out(out, P, run, d):
    runs = {s: jobs_for(out, P, s, 0, d["lengths"], d["beta"], d["lr"], list(ARMS), P["T"],
                        {k: d[k] for k in ("alpha_B", "alpha_D")}) for s in P["heldout"]}
    run([j for b, arms in runs.values() for j in (b, *arms)])
    return {s: dict(zip(ARMS, arms)) for s, (_, arms) in runs.items()}


# ---- the report ---------------------------------------------------------------------------------

def interval(xs, q):
    """(mean, std, lower, upper): the two-sided t-interval of the mean, q the t quantile table."""
    n, m = len(xs), statistics.mean(xs)
    sd = statistics.stdev(xs) if n > 1 else float("nan")
    half = q.get(n - 1, float("nan")) * sd / math.sqrt(n)
    return m, sd, m - half, m + half


def decide(lo, hi):
    if lo > 0:
        return "helps" + (", by less than the margin" if hi <= DELTA else "")
    if hi < 0:
        return "hurts"
    return "equivalent" if -DELTA <= lo and hi <= DELTA else "inconclusive"


def per_stage(job, stage):
    """Every endpoint of one run at one stage."""
    res, ana = job.results()[stage], job.analysis().get(stage, {})
    rows = [r for r in read_metrics(os.path.join(job.dir, "metrics.jsonl")) if r.get("stage") == stage and "step" in r]
    return {"reward": res["reward"], "perfect": res["perfect"], "kl": res["kl"],
            "pass_at_16": ana.get("pass_at_k"), "best_of_8": ana.get("best_of_8"),
            "strictly_better": better_share(job, stage),
            "saturated": statistics.mean(r["rewards/saturated"] for r in rows),
            "chosen_logp_drift": rows[-1]["logps/chosen"] - rows[0]["logps/chosen"]}


def report(out, P, d, runs):
    T, seeds = P["T"], sorted(runs)
    saved = load_checkpoint(os.path.join(runs[seeds[0]]["A"].base.dir, "dpo.pt"))["config"]  # the eval prompts
    prompts = [e["prompt"] for e in inputs.load_data(train.Config(**saved)).eval]
    ep = {a: {t: [per_stage(runs[s][a], f"selm_{t}") for s in seeds] for t in range(1, T + 1)} for a in ARMS}
    keys = ["reward", "perfect", "pass_at_16", "best_of_8", "strictly_better", "saturated", "chosen_logp_drift", "kl"]
    lines = ["# The preregistered study: results", "",
             f"Task: words of {d['lengths'][0]}-{d['lengths'][1]} letters"
             + (" (a deviation: no candidate met every calibration criterion)" if d["deviation"] else "")
             + f"; beta {d['beta']:g}, lr {d['lr']:g}; alpha_B {d['alpha_B']:g}, alpha_D {d['alpha_D']:g}; "
             f"T = {T}; held-out seeds {seeds}. Calibration: {json.dumps(d['calibration'])}. "
             f"Tuning: beta/lr grid {json.dumps(d['beta_lr_grid'])}, alpha grid {json.dumps(d['alpha_grid'])}.", "",
             "## Endpoints per arm and iteration (mean ± std over held-out seeds)", "",
             "| arm | iter | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for a, (name, _) in ARMS.items():
        for t in range(1, T + 1):
            lines.append(f"| {a}: {name} | {t} | " + " | ".join(mean_sd([e[k] for e in ep[a][t]]) for k in keys) + " |")
    summary = {"decisions": {}, "per_iteration": {}}
    lines += ["", "## Primary endpoint: paired difference in final greedy reward", "",
              "| comparison | iteration | mean | std | 97.5% interval | decision |", "|---|---|---|---|---|---|"]
    for label, x, y in (("H1: D - C", "D", "C"), ("H2: B - A", "B", "A")):
        for t in range(1, T + 1):
            diffs = [ex["reward"] - ey["reward"] for ex, ey in zip(ep[x][t], ep[y][t])]
            m, sd, lo, hi = interval(diffs, T_QUANTILE)
            summary["per_iteration"].setdefault(label, []).append([m, lo, hi])
            verdict = decide(lo, hi) if t == T else ""
            if t == T:
                summary["decisions"][label] = {"mean": m, "std": sd, "interval": [lo, hi], "decision": verdict}
            lines.append(f"| {label} | {t} | {m:+.4f} | {sd:.4f} | [{lo:+.4f}, {hi:+.4f}] | {verdict} |")
    t95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447}
    lines += ["", "## Secondary comparisons at the last iteration (95% intervals, no decision)", "",
              "| comparison | endpoint | mean | 95% interval |", "|---|---|---|---|"]
    for label, x, y in (("H3: E - C", "E", "C"), ("D - C", "D", "C"), ("B - A", "B", "A")):
        for k in keys[1:]:
            diffs = [ex[k] - ey[k] for ex, ey in zip(ep[x][T], ep[y][T]) if ex[k] is not None and ey[k] is not None]
            if diffs:
                m, _, lo, hi = interval(diffs, t95)
                lines.append(f"| {label} | {k} | {m:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
        if label.startswith("H3"):
            m, _, lo, hi = interval([ex["reward"] - ey["reward"] for ex, ey in zip(ep[x][T], ep[y][T])], t95)
            lines.append(f"| {label} | reward | {m:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
    lines += ["", "## Head-to-head at the last iteration (greedy answers, ties half)", "",
              "| comparison | win rate, mean ± std over seeds |", "|---|---|"]
    for x, y in (("D", "C"), ("B", "A"), ("E", "C")):
        wr = [statistics.mean(win(*judge(p, [ax, ay])) for p, ax, ay in
                              zip(prompts, runs[s][x].analysis()[f"selm_{T}"]["answers"],
                                  runs[s][y].analysis()[f"selm_{T}"]["answers"])) for s in seeds]
        summary.setdefault("head_to_head", {})[f"{x} vs {y}"] = wr
        lines.append(f"| {x} vs {y} | {mean_sd(wr)} |")
    cov = [ex["pass_at_16"] - ey["pass_at_16"] for ex, ey in zip(ep["D"][T], ep["C"][T])]
    better = [statistics.mean(ep["D"][t][i]["strictly_better"] - ep["C"][t][i]["strictly_better"]
                              for t in range(max(1, T - 2), T + 1)) for i in range(len(seeds))]
    h1 = summary["decisions"]["H1: D - C"]["decision"]
    shown = statistics.mean(cov) > 0 and statistics.mean(better) > 0
    mech = (("confirmed" if shown else "helps; mechanism not shown") if h1.startswith("helps")
            else "the term explores, and it does not pay" if shown else "not confirmed")
    summary["mechanism"] = {"pass_at_16_diff": cov, "strictly_better_diff_late": better, "verdict": mech}
    lines += ["", f"Mechanism (D vs C): pass@16 difference at iteration {T}: {mean_sd(cov)}; strictly better online "
              f"answers, iterations {max(1, T - 2)}-{T}: {mean_sd(better)}. Verdict: **{mech}**."]
    atomic_write(os.path.join(out, "report.md"), lambda f: f.write("\n".join(lines) + "\n"), binary=False)
    write_json_atomic(summary, os.path.join(out, "report.json"))
    plots.primary_endpoint(summary["per_iteration"], T, DELTA, os.path.join(out, "primary.png"))
    print("\n".join(lines))


# ---- the command ------------------------------------------------------------------------------

def parser():
    return experiment_parser("study", __doc__, "the same machinery at toy scale (the tiny model, minutes)")


def main(argv=None):
    ap = parser()
    args, extra = ap.parse_known_args(argv)  # the unknown flags go to every train.py run
    with one_line_errors(ap.prog):
        check_common(args, extra, "study")
        run_study(args, extra)


def run_study(args, extra):
    """Calibration, tuning and the held-out runs, each decision kept in decisions.json so that
    a rerun goes on from there; then the report. extra: train.py flags added to every run."""
    P, out = QUICK if args.quick else FULL, args.out
    path = os.path.join(out, "decisions.json")
    os.makedirs(out, exist_ok=True)
    decisions = read_json(path) if os.path.exists(path) else {}  # edited by hand into nonsense: one line

    def run(jobs):
        jobs = list({j.name: j for j in jobs}.values())  # a shared base run once
        if args.report_only and not all(j.complete() for j in jobs):
            sys.exit("study: --report-only, but runs are missing")
        failed = run_all(jobs, out, args.jobs, extra, ["--k", str(P["k"]), "--diag-prompts", str(P["diag"]),
                                                       "--no-implicit"])
        if failed:
            sys.exit(f"study: {len(failed)} runs failed: {', '.join(sorted(failed))}")

    if "lengths" not in decisions:
        lengths, deviation = calibrate(out, P, run, decisions)
        decisions.update(lengths=list(lengths), deviation=deviation)
        write_json_atomic(decisions, path)
    if "alpha_D" not in decisions:
        decisions.update(tune(out, P, run, decisions["lengths"]))
        write_json_atomic(decisions, path)
    runs = held_out(out, P, run, decisions)
    report(out, P, decisions, runs)


if __name__ == "__main__":
    main()
