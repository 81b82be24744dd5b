"""
runner.py -- what the sweep and the study share: a train.py run and its analysis as one job,
and a small process pool that runs many jobs with dependencies, resume and an ETA.

A job lives in <out>/<name>/: train.py writes its checkpoints, results.json and metrics.jsonl
there, experiments.analyse its analysis.json, the pool its log (sweep.log) and, while it runs,
a lock holding the process id (sweep.lock). A job that starts from another one (`base`: the
shared SFT + offline DPO) waits for it and copies its stages (`train.py --start-from`); one
that was interrupted continues (`train.py --resume`); a complete one is skipped. Several
invocations may share one <out>: they see each other's locks, and `--jobs` bounds them together.
"""

import argparse
import glob
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time

import inputs
import train
from checkpoint import stage_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py, the chapters


def parser(name, doc, quick):
    """The command line of experiments/NAME.py, with the flags every experiment takes: --quick
    (`quick`: what it shrinks), --out, --jobs and --report-only (check_experiment checks them).
    doc: the experiment's docstring, whose first paragraph is its description."""
    ap = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc.split("\n\n")[0].strip())
    ap.add_argument("--quick", action="store_true", help=quick)
    out = f"out/{out_name(name)}"
    ap.add_argument("--out", default=None, help=f"output root (default {out}, or {out}-quick)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each one single-threaded)")
    ap.add_argument("--report-only", action="store_true", help="tabulate the runs there, run nothing")
    return ap


def out_name(name):
    return name.replace("_", "-")


def check_experiment(args, name):
    """The flags every experiment takes, checked: --jobs, and --out (by default out/NAME, or
    out/NAME-quick with --quick: set here)."""
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if args.out == "" or args.out is not None and os.path.isfile(args.out):
        raise ValueError(f"--out {args.out!r} is not a directory")
    args.out = args.out or f"out/{out_name(name)}" + ("-quick" if args.quick else "")


def check_common(args, extra, name):
    """The flags the sweep and the study share, checked: those of every experiment
    (check_experiment), and the train.py flags passed to every run (inputs.check_config).
    Returns those as a checked train.Config."""
    check_experiment(args, name)
    cfg = train.parse_args(extra)
    try:
        inputs.check_config(cfg)
    except ValueError as e:
        raise ValueError(f"a train.py flag: {e}") from None
    return cfg


def mean_sd(xs, fmt="{:.3f}"):
    """xs (None left out) as "mean ± std" over seeds in fmt; one value alone, or "-" for none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = fmt.replace("+", "").format(statistics.stdev(xs)) if len(xs) > 1 else None
    return fmt.format(statistics.mean(xs)) + (f" ± {sd}" if sd else "")


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class Job:
    """One train.py run (`flags`, then `iterations` SELM iterations) in <out>/<name>, and its
    analysis. `base`: the job whose offline DPO it starts from (None: it is a base job, SFT +
    offline DPO, and `iterations` is 0)."""

    def __init__(self, out, name, flags, iterations, base=None):
        self.name, self.dir, self.flags, self.base = name, os.path.join(out, name), flags, base
        self.iterations, self.stages = iterations, stage_names(iterations)

    def results(self):
        """results.json by stage: {stage: row}."""
        return {r["stage"]: r for r in read_json(os.path.join(self.dir, "results.json"), [])}

    def analysis(self):
        return read_json(os.path.join(self.dir, "analysis.json"), {})

    def final(self, key="reward"):
        """A figure of its last stage's row of results.json."""
        return self.results()[self.stages[-1]][key]

    def trained(self):
        return list(self.results()) == self.stages

    def own_stages(self):  # the stages this job analyses (the base's are shared)
        return self.stages if self.base is None else self.stages[2:]

    def complete(self):
        return self.trained() and set(self.own_stages()) <= set(self.analysis())

    def commands(self, extra, analyse_flags):
        """The shell commands still to run: train.py (unless trained; `extra` after the job's
        own flags, so it overrides them), then the analysis (it skips what is done)."""
        cmds = []
        if not self.trained():
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), *self.flags, "--iterations", str(self.iterations),
                   "--out-dir", self.dir, *extra]
            if any(f.endswith(".pt") for f in os.listdir(self.dir)):
                cmd += ["--resume"]  # interrupted: continue after its last checkpoint
            elif self.base is not None:
                cmd += ["--start-from", os.path.join(self.base.dir, "dpo.pt")]
            cmds.append(cmd)
        cmds.append([sys.executable, "-m", "experiments.analyse", self.dir, *analyse_flags])
        return cmds


# ---- the pool -----------------------------------------------------------------------------

def live_lock(path):
    """True if the lock file names a live process: a job that some invocation is running now."""
    try:
        with open(path) as f:
            os.kill(int(f.read()), 0)
        return True
    except (OSError, ValueError):
        return False


def busy(out):
    """Jobs in progress under `out`, by any invocation sharing it."""
    return sum(map(live_lock, glob.glob(os.path.join(out, "**", "sweep.lock"), recursive=True)))


def run_all(jobs, out, n_jobs, extra, analyse_flags):
    """Run every incomplete job, at most n_jobs at once (each a single-threaded subprocess),
    a base before the jobs that start from it; returns the names of the jobs that failed (or
    were skipped because their base failed). extra: train.py flags for every run;
    analyse_flags: experiments.analyse's."""
    t0 = time.time()
    todo = []
    for j in jobs:
        if j.complete():
            print(f"skipped {j.name} (complete)", flush=True)
        else:
            todo.append(j)
    guess = {"base": 300.0, "method": 120.0}  # seconds per job until measured (small, 2 cores)
    took = {"base": [], "method": []}
    kind = lambda j: "base" if j.base is None else "method"  # noqa: E731

    def est(j):
        return statistics.mean(took[kind(j)]) if took[kind(j)] else guess[kind(j)]

    running, failed, n_done, total = {}, set(), 0, len(todo)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    while todo or running:
        reaped = False
        for j, (proc, start, log) in list(running.items()):
            if proc.poll() is None:
                continue
            reaped = True
            del running[j]
            log.close()
            os.remove(os.path.join(j.dir, "sweep.lock"))
            n_done += 1
            dt = time.time() - start
            if proc.returncode != 0:
                failed.add(j.name)
                print(f"[{n_done}/{total}] FAILED {j.name} (exit {proc.returncode}), see {j.dir}/sweep.log", flush=True)
                continue
            took[kind(j)].append(dt)
            left = sum(map(est, todo)) + sum(max(0.0, est(x) - (time.time() - s)) for x, (_, s, _) in running.items())
            row = j.results()[j.stages[-1]]
            vs_ref = row["win_rate_vs_reference"]
            print(f"[{n_done}/{total}] {j.name:<34} {dt:5.0f}s  reward {row['reward']:.3f}  "
                  f"win vs ref {'-' if vs_ref is None else format(vs_ref, '.3f')}   "
                  f"elapsed {(time.time() - t0) / 60:5.1f} min, ETA {left / max(1, n_jobs) / 60:5.1f} min", flush=True)
        if reaped:  # let other invocations sharing `out` see the free slot too, in random order
            time.sleep(random.uniform(0.0, 1.0))
        for j in list(todo):
            if len(running) >= n_jobs or busy(out) >= n_jobs:
                break
            if j.base is not None and j.base.name in failed:
                todo.remove(j)
                failed.add(j.name)
                n_done += 1
                print(f"[{n_done}/{total}] SKIPPED {j.name}: its base run failed", flush=True)
                continue
            waits = j.base is not None and (j.base in running or not j.base.trained())
            if waits or live_lock(os.path.join(j.dir, "sweep.lock")):
                continue  # it waits for its base, or another invocation has it
            if j.complete():  # finished by another invocation meanwhile
                todo.remove(j)
                n_done += 1
                print(f"[{n_done}/{total}] {j.name} was completed by another invocation", flush=True)
                continue
            todo.remove(j)
            os.makedirs(j.dir, exist_ok=True)
            log = open(os.path.join(j.dir, "sweep.log"), "a")
            script = " && ".join(shlex.join(c) for c in j.commands(extra, analyse_flags))
            log.write(f"$ {script}\n")
            log.flush()
            proc = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            with open(os.path.join(j.dir, "sweep.lock"), "w") as f:
                f.write(str(proc.pid))
            running[j] = (proc, time.time(), log)
        time.sleep(0.5)
    print(f"runs finished in {(time.time() - t0) / 60:.1f} min ({len(failed)} failed)", flush=True)
    return failed
