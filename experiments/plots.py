"""
plots.py -- a run's curves, and the figures of the sweep, the study and the chat-model
comparison, drawn when matplotlib is installed.

    python -m experiments.plots out        # out/curves.png: the run in out/, step by step

matplotlib is optional: without it these functions draw nothing and say so once, and the
tables (the results themselves) are written all the same.
"""

import argparse
import os
import statistics
import sys

from commands import DefaultsHelp, one_line_errors
from files import atomic_write_path
from runtime import read_metrics


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)")
        return None
    return plt


def sweep_curves(d, table, methods, label, T, path):
    """Reward and win rate against the reference per iteration (0 = offline DPO), one line per
    method; table[row name][key] holds the per-seed values of sweep.py's Table 1."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ["reward", "win_rate_vs_reference"]):
        for m in methods:
            names = ["offline DPO"] + [f"{label(m)}, iter {t}" for t in range(1, T + 1)]
            ys = [statistics.mean(table[n][key]) if table[n][key] else float("nan") for n in names]
            ax.plot(range(T + 1), ys, marker="o", label=label(m))
        ax.set_xlabel("iteration (0 = offline DPO)")
        ax.set_ylabel(key)
        ax.set_title(d)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, dpi=100))  # the format: tmp's extension, path's
    plt.close(fig)


def primary_endpoint(per_iteration, T, delta, path):
    """The study's primary endpoint per iteration: each comparison's mean paired difference
    with its interval (per_iteration[label] = [[mean, lower, upper] per iteration]), the
    equivalence margin +-delta shaded."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in per_iteration.items():
        m, lo, hi = zip(*rows)
        ax.errorbar(range(1, T + 1), m, yerr=[[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]],
                    marker="o", capsize=3, label=label)
    ax.axhline(0, color="gray", lw=0.8)
    ax.axhspan(-delta, delta, color="gray", alpha=0.15)
    ax.set_xlabel("SELM iteration")
    ax.set_ylabel("paired difference in greedy reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, dpi=100))  # the format: tmp's extension, path's
    plt.close(fig)


def arms_by_stage(per_stage, names, T, path):
    """The chat-model comparison: held-out prompt-level accuracy per stage (starting model,
    offline DPO, then each iteration), one line per arm, mean over seeds with the seeds' spread;
    per_stage[arm] = [per-seed values of each stage]."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (arm, stages) in enumerate(per_stage.items()):
        xs = [x + 0.04 * (k - 1.5) for x in range(T + 2)]  # side by side, not on top of each other
        m = [statistics.mean(v) for v in stages]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in stages]
        ax.errorbar(xs, m, yerr=sd, marker="o", capsize=3, label=f"{arm}: {names[arm]}")
    ax.set_xticks(range(T + 2), ["start", "offline DPO"] + [f"iter {t}" for t in range(1, T + 1)])
    ax.set_ylabel("held-out prompt-level accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, dpi=100))  # the format: tmp's extension, path's
    plt.close(fig)


# ---- one run's curves -----------------------------------------------------------------------

STEP_FIGURES = ("loss", "rewards/margins", "rewards/accuracies")  # TRL's names, as metrics.jsonl logs them
HELD_OUT = (("reward", "win_rate_vs_sft", "win_rate_vs_reference"), ("kl",),
            ("prompt_accuracy", "instruction_accuracy"))


def run_curves(run_dir, path):
    """A run's figures from its metrics.jsonl, drawn to `path`: along the top, each logged step
    of SFT (its cross-entropy) and of the preference stages (TRL's loss, rewards/margins and
    rewards/accuracies), the stages one after another and marked; along the bottom, each
    stage's held-out evaluation (reward and win rates; KL to the SFT model, in nats; and the
    instruction task's IFEval accuracies). Returns `path`, or None without matplotlib."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r for r in rows if "step" in r and "loss" in r]
    evals = [r["eval"] for r in rows if "eval" in r]
    if not steps and not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no logged step and no evaluation yet")
    plt = pyplot()
    if plt is None:
        return None
    held_out = [keys for keys in HELD_OUT if any(r.get(k) is not None for r in evals for k in keys)]
    n = max(1 + len(STEP_FIGURES), len(held_out))
    fig, axes = plt.subplots(2, n, figsize=(4 * n, 7), squeeze=False)
    sft = [r for r in steps if r["stage"] == "sft"]
    pref = [r for r in steps if r["stage"] != "sft"]
    for ax, key, part in [(axes[0][0], "loss", sft)] + [(ax, k, pref) for ax, k in zip(axes[0][1:], STEP_FIGURES)]:
        x, offset, stage, starts = [], 0, None, []
        for r in part:  # the stages one after another: each starts where the last one ended
            if r["stage"] != stage:
                offset, stage = (x[-1] + 1 if x else 0), r["stage"]
                starts.append((offset, stage))
            x.append(offset + r["step"])
        ax.plot(x, [r[key] for r in part], lw=1)
        for x0, name in starts:
            ax.axvline(x0, color="gray", lw=0.5, ls="--")
            ax.text(x0, 1, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="gray")
        ax.set_title(f"sft: {key}" if part is sft else key)
        ax.set_xlabel("step")
        ax.set_visible(bool(part))  # no SFT steps: a run that kept the starting weights
    names = [r["stage"] for r in evals]
    for ax, keys in zip(axes[1], held_out):
        for k in keys:
            if any(r.get(k) is not None for r in evals):
                ax.plot(names, [r.get(k) for r in evals], marker="o", label=k)
        ax.set_title("held out: " + {"kl": "KL to the SFT model (nats)", "reward": "reward and win rates"}.get(
            keys[0], "IFEval's accuracies"))
        ax.legend(fontsize=7)
    for ax in [*axes[0][1 + len(STEP_FIGURES):], *axes[1][len(held_out):]]:
        ax.set_visible(False)
    fig.suptitle(os.path.abspath(run_dir), fontsize=9)
    fig.tight_layout()
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, dpi=100))  # the format: tmp's extension, path's
    plt.close(fig)
    return path


def parser():
    ap = argparse.ArgumentParser(prog="python -m experiments.plots", formatter_class=DefaultsHelp,
                                 description="Draw a run's curves from its metrics.jsonl: each step's loss, "
                                             "rewards/margins and rewards/accuracies, each stage's held-out figures.")
    ap.add_argument("run_dir", help="the run's --out-dir")
    ap.add_argument("--out", help="the PNG to write (default: RUN_DIR/curves.png)")
    return ap


def check_args(args):
    if not os.path.isfile(os.path.join(args.run_dir, "metrics.jsonl")):
        raise ValueError(f"RUN_DIR {args.run_dir!r} holds no metrics.jsonl: give a run's --out-dir")
    if args.out is not None and (not args.out.endswith(".png") or not os.path.isdir(os.path.dirname(args.out) or ".")):
        raise ValueError(f"--out {args.out!r}: give a .png file in a directory that exists")


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        path = args.out or os.path.join(args.run_dir, "curves.png")
        if run_curves(args.run_dir, path) is None:
            sys.exit(1)  # pyplot() said why
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
