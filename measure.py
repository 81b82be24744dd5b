"""
measure.py -- timing, memory and reporting for the benchmarks (bench.py, bench_sampling.py).

Every figure is printed as ours, baseline, ratio and target, and kept in RESULTS for the
JSON line bench.py ends with. Timings interleave ours and the baseline round-robin and take
medians, so that a change in the machine's load hits both alike.
"""

import contextlib
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
    """Median seconds of each fn in the dict, calls interleaved round-robin so that a change
    in the machine's load hits all of them alike. Also returns each fn's last output."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times, outs = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, outs[name] = timed(fn, device)
            times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def report(name, ours, baseline, unit, target=None, better="higher", ratio=None, note=""):
    """Print one figure and keep it for the JSON line. ratio defaults to ours / baseline;
    a figure without a baseline (baseline None) has no ratio."""
    if ratio is None and baseline is not None:
        ratio = ours / baseline
    ok = ""
    if target is not None:
        met = ratio >= target if better == "higher" else ratio <= target
        ok = f"{'>=' if better == 'higher' else '<='} {target:g}  {'MET' if met else 'MISSED'}"
    shown = "-" if ratio is None else f"{ratio:.3f}x"
    print(f"  {name:<36} {_fmt(ours):>10} {_fmt(baseline):>10} {unit:<7} {shown:>9}  {ok}"
          + (f"  ({note})" if note else ""), flush=True)
    RESULTS[name] = {"ours": ours, "baseline": baseline, "unit": unit,
                     "ratio": None if ratio is None else round(ratio, 4),
                     "target": target, "better": better}


def _fmt(x):
    return "-" if x is None else f"{x:.4g}"


def header(title):
    print(f"\n== {title}", flush=True)
    print(f"  {'figure':<36} {'ours':>10} {'baseline':>10} {'unit':<7} {'ratio':>9}  target",
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


