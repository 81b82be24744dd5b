"""
measure.py -- timing, memory and reporting for the benchmarks (perf/bench.py, perf/sampling.py).

Every figure is printed as ours, baseline, ratio and target, and kept in RESULTS for the
JSON line bench.py ends with. Timings interleave ours and the baseline round-robin, at least
three rounds; a ratio is the median of the per-round ratios, printed with their spread, so
that a change in the machine's load hits both sides alike and a noisy figure says so.
"""

import contextlib
import io
import os
import platform
import statistics
import sys
import time

import torch

from model import GPT

RESULTS = {}  # figure name -> {"ours", "baseline", "ratio", "target", "better"}


# ---- timing and reporting -------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds one call of fn takes, device work included; what fn returned)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def compare(fns, device, repeats, warmup=1):
    """Seconds per call of each fn in the dict, calls interleaved round-robin so that a change
    in the machine's load hits all of them alike: a Timings of every round's seconds per fn,
    and each fn's last output."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times, outs = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, outs[name] = timed(fn, device)
            times[name].append(t)
    return Timings(times), outs


class Timings(dict):
    """{fn name: [seconds, one per round]}, rounds interleaved. t[name] is the median; ratio()
    compares two fns round by round, so that a slow round slows both sides of its ratio."""

    def __getitem__(self, name):
        return statistics.median(self.rounds(name))

    def rounds(self, name):
        return dict.__getitem__(self, name)

    def ratio(self, num, den):
        """Per-round ratios seconds[num] / seconds[den]: their median and their (min, max)."""
        r = [a / b for a, b in zip(self.rounds(num), self.rounds(den))]
        return statistics.median(r), (min(r), max(r))


SPREAD_LIMIT = 0.10  # a ratio whose rounds spread wider than this, relative, is not trusted


def report(name, ours, baseline, unit, target=None, better="higher", ratio=None, note="",
           spread=None):
    """Print one figure and keep it for the JSON line. ratio defaults to ours / baseline;
    a figure without a baseline (baseline None) has no ratio. spread: (lowest, highest) ratio
    over the interleaved rounds the ratio is the median of; printed, and flagged when wider
    than SPREAD_LIMIT of the ratio: such a figure is not to be trusted."""
    if ratio is None and baseline is not None:
        ratio = ours / baseline
    ok = ""
    if target is not None:
        met = ratio >= target if better == "higher" else ratio <= target
        ok = f"{'>=' if better == 'higher' else '<='} {target:g}  {'MET' if met else 'MISSED'}"
    shown = "-" if ratio is None else f"{ratio:.3f}x"
    wide = spread is not None and (spread[1] - spread[0]) > SPREAD_LIMIT * ratio
    if spread is not None:
        note = (f"rounds {spread[0]:.3f}..{spread[1]:.3f}x" +
                (" TOO WIDE TO TRUST" if wide else "") + (f"; {note}" if note else ""))
    print(f"  {name:<40} {_fmt(ours):>10} {_fmt(baseline):>10} {unit:<7} {shown:>9}  {ok}"
          + (f"  ({note})" if note else ""), flush=True)
    RESULTS[name] = {"ours": ours, "baseline": baseline, "unit": unit,
                     "ratio": None if ratio is None else round(ratio, 4),
                     "target": target, "better": better,
                     "spread": None if spread is None else [round(x, 4) for x in spread],
                     "trusted": not wide}


def _fmt(x):
    return "-" if x is None else f"{x:.4g}"


def header(title):
    print(f"\n== {title}", flush=True)
    print(f"  {'figure':<40} {'ours':>10} {'baseline':>10} {'unit':<7} {'ratio':>9}  target",
          flush=True)


def random_model(config, device, seed=0):
    torch.manual_seed(seed)
    return GPT(config).to(device).eval()


def autocast(args, device):
    """bf16 autocast when asked for (--bf16), a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)



# ---- memory ------------------------------------------------------------------------------

def peak_memory(fn, device):
    """Bytes allocated by fn at its peak, above what was allocated when it started.

    CUDA: the caching allocator's own counter. CPU: the profiler's allocation events, each of
    which carries the CPU allocator's running total -- the same quantity as on CUDA (bytes
    held by live tensors), not the resident set, which the C library's heap blurs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:  # the event tree is the profiler's own (private) structure: guard against changes
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
            fn()
        peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                peak = max(peak, node.extra_fields.total_allocated)
        return peak
    except (ImportError, AttributeError) as e:
        print(f"  (no CPU memory measurement with this torch: {e})")
        return float("nan")


@contextlib.contextmanager
def silenced():
    """Nothing printed: neither to stdout nor, at the file descriptor, to stderr (progress bars)."""
    with _stderr_silenced(), contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side logs a line to stderr at every start and stop; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)




# ---- a SELM iteration, by train.py's own clock ------------------------------------------------

def selm_iteration_times(argv):
    """Run train.py with argv (its last stage a SELM iteration) in a temporary --out-dir, silenced;
    the last iteration's "online" record of metrics.jsonl: t_sample, t_judge, t_ref_logps, t_train."""
    import tempfile

    import train
    from runtime import read_metrics
    with tempfile.TemporaryDirectory() as out, silenced():
        train.run(train.parse_args([*argv, "--out-dir", out]))
        return [r["online"] for r in read_metrics(f"{out}/metrics.jsonl") if "online" in r][-1]


def report_iteration(info, prefix):
    """Each part of an iteration (selm_iteration_times) as a share of the four's wall time."""
    parts = {"sampling": info["t_sample"], "judging": info["t_judge"],
             "reference log-probs": info["t_ref_logps"], "training": info["t_train"]}
    total = sum(parts.values())
    for name, sec in parts.items():
        target = 0.5 if name == "sampling" else None
        report(f"{prefix}: {name}", 100 * sec / total, None, "% of wall", ratio=sec / total,
               target=target, better="lower", note=f"{sec:.2f} s of {total:.2f} s")


# ---- the machine -----------------------------------------------------------------------------

def machine(device):
    d = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
         "threads": torch.get_num_threads(), "cpu": _cpu_name(), "cores": os.cpu_count()}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        d["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return d


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_warning(info, own_load=0.0):
    """Other processes on the CPU make every timing here unreliable, and several torch threads
    worse still: each parallel region waits for its slowest thread, i.e. for a time slice.
    own_load: what this run itself adds to the load average (its threads, at the end)."""
    load, cores = info.get("load_avg_1min", 0), os.cpu_count() or 1
    if load - own_load > 0.5 * cores:
        print(f"  warning: load average {load} on {cores} cores: other processes are using the "
              f"CPU and the timings are noisy"
              + ("; with --threads 1 less so" if info["threads"] > 1 else ""), flush=True)


