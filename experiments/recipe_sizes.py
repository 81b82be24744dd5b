"""
recipe_sizes.py -- how long the instruction recipe takes at a given size: prompts per chunk and
answer length against time, measured, so that the recipe's sizes are chosen from a table.

    python -m experiments.recipe_sizes --init-from models/SmolLM2-135M-Instruct   # ~30 min on 2 cores
    python -m experiments.recipe_sizes --init-from DIR --quick                     # the machinery

Each cell of the grid is one short train.py run (the offline pairs of two chunks, offline DPO
and one SELM iteration, each stage evaluated on --n-eval held-out prompts) in
<out>/C<prompts>-L<tokens>/, with the whole machine (--threads). Its phases are timed from its
metrics.jsonl: the evaluations (the starting model's has no KL samples, a trained stage's has),
offline DPO's training, the SELM iteration's sampling, judging, reference log-probs and training,
and what is left of the wall time: loading and the offline pairs. The full recipe's time is then
predicted phase by phase, each scaled by how many times the recipe runs it and on how many
prompts (T iterations: T + 1 chunks of pairs, T + 2 evaluations of --recipe-eval prompts). Cells
already run are read, not run again.
"""

import json
import os
import subprocess
import sys
import time

from commands import one_line_errors
from experiments.runner import ROOT, check_experiment, parser as experiment_parser, read_json
from files import atomic_write, write_json_atomic

FULL = dict(grid=[(64, 128), (256, 128), (64, 192), (256, 192)], n_eval=64)
QUICK = dict(grid=[(8, 48), (16, 48)], n_eval=4)


def run_cell(args, chunk, tokens, n_eval):
    """The cell's train.py run (once): its directory and wall seconds."""
    out = os.path.join(args.out, f"C{chunk}-L{tokens}")
    done = read_json(os.path.join(out, "cell.json"))
    if done is not None:
        return out, done["wall"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--init-from", args.init_from, "--task", "instructions",
           "--iterations", "1", "--chunk-size", str(chunk), "--max-new-tokens", str(tokens), "--n-eval", str(n_eval),
           "--out-dir", out]
    print(f"C{chunk}-L{tokens}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise ValueError(f"the run of C{chunk}-L{tokens} failed: {proc.stderr.strip().splitlines()[-1]}")
    write_json_atomic({"wall": time.time() - t0}, os.path.join(out, "cell.json"))
    return out, time.time() - t0


def phases(out, wall):
    """A finished cell's seconds by phase, and what its data held."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    stage_time = {r["eval"]["stage"]: r["time"] for r in rows if "eval" in r}
    online = next(r["online"] for r in rows if "online" in r and "eval" not in r)
    offline = next(r["offline_pairs"] for r in rows if "offline_pairs" in r)
    iteration = sum(online[k] for k in ("t_sample", "t_judge", "t_ref_logps", "t_train"))
    eval_trained = stage_time["selm_1"] - iteration  # a trained stage's evaluation: greedy answers and KL
    prompts = len(next(r["answers"] for r in rows if "eval" in r))
    return {"start_and_pairs": wall - sum(stage_time.values()), "eval_start": stage_time["sft"],
            "eval_trained": eval_trained, "dpo_train": stage_time["dpo"] - eval_trained, "iteration": iteration,
            **{k: online[k] for k in ("t_sample", "t_judge", "t_ref_logps", "t_train")},
            "pairs": offline["pairs"],
            "offline_unfinished": offline["unfinished_chosen"] + offline["unfinished_rejected"],
            "y_ref_cut": online["y_ref_truncated"], "online_prompts": online["pairs"] + online["dropped_ties"],
            "eval_prompts": prompts}


def predicted(p, T, n_eval):
    """The full recipe's seconds from a cell's phases: T + 1 chunks of pairs (the cell made 2),
    the starting model's evaluation and T + 1 trained ones on n_eval prompts, offline DPO, T
    iterations (each as long as the cell's one)."""
    scale = n_eval / p["eval_prompts"]
    return (p["start_and_pairs"] * (T + 1) / 2 + p["eval_start"] * scale + p["eval_trained"] * scale * (T + 1)
            + p["dpo_train"] + p["iteration"] * T)


def table(cells, T, n_eval):
    lines = ["| prompts per chunk | answer tokens | pairs kept (chunk 0, 1) | offline answers cut off | y_ref cut off "
             "| start + pairs (s) | evaluation, start / trained (s) | offline DPO (s) | SELM iteration (s): sample, "
             f"judge, ref log-probs, train | predicted recipe, T = {T}, {n_eval} held out (min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (chunk, tokens), p in cells:
        lines.append(
            f"| {chunk} | {tokens} | {p['pairs'][0]}, {p['pairs'][1]} | {p['offline_unfinished']} of "
            f"{2 * sum(p['pairs'])} | {p['y_ref_cut']} of {p['online_prompts']} | {p['start_and_pairs']:.0f} | "
            f"{p['eval_start']:.0f} / {p['eval_trained']:.0f} ({p['eval_prompts']} prompts) | {p['dpo_train']:.0f} | "
            f"{p['iteration']:.0f}: {p['t_sample']:.0f}, {p['t_judge']:.0f}, {p['t_ref_logps']:.0f}, "
            f"{p['t_train']:.0f} | {predicted(p, T, n_eval) / 60:.1f} |")
    return lines


def parser():
    ap = experiment_parser("recipe_sizes", __doc__, "two toy cells, in minutes")
    ap.add_argument("--init-from", required=True, help="the chat model's directory (python -m tools.gguf_to_hf)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run: the whole machine")
    ap.add_argument("--iterations", type=int, default=2, help="T of the recipe whose time is predicted")
    ap.add_argument("--recipe-eval", type=int, default=256, help="held-out prompts of the recipe whose time is "
                                                                 "predicted")
    return ap


def check_args(args):
    if not os.path.isfile(os.path.join(args.init_from, "config.json")):
        raise ValueError(f"--init-from {args.init_from!r} is not a Hugging Face model directory (no config.json)")
    for name in ("threads", "iterations", "recipe_eval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_experiment(args, "recipe_sizes")  # --jobs is not used: a cell has the whole machine (--threads)


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        measure(args)


def measure(args):
    P = QUICK if args.quick else FULL
    args.init_from = os.path.abspath(args.init_from)
    os.makedirs(args.out, exist_ok=True)
    cells = []
    for chunk, tokens in P["grid"]:
        out = os.path.join(args.out, f"C{chunk}-L{tokens}")
        if args.report_only and read_json(os.path.join(out, "cell.json")) is None:
            continue
        cells.append(((chunk, tokens), phases(*run_cell(args, chunk, tokens, P["n_eval"]))))
    lines = table(cells, args.iterations, args.recipe_eval)
    atomic_write(os.path.join(args.out, "table.md"), lambda f: f.write("\n".join(lines) + "\n"), binary=False)
    write_json_atomic([{"chunk_size": c, "max_new_tokens": t, **p} for (c, t), p in cells],
                      os.path.join(args.out, "table.json"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
