"""
plots.py -- the figures of the sweep, the study and the chat-model comparison, drawn when
matplotlib is installed.

matplotlib is optional: without it these functions draw nothing and say so once, and the
tables (the results themselves) are written all the same.
"""

import statistics

from checkpoint import atomic_write_path


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
