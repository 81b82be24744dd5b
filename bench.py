"""
bench.py -- how fast selm's hot paths are, each against a baseline timed in the same run.

    python bench.py                                   # every section, default sizes
    python bench.py --sections sampling --device cuda
    python bench.py --quick                           # a smoke test: small sizes, seconds

Sections (all on random-weight models; no data, no checkpoint):
  sampling  tokens/s of sample.generate (ragged batch of 32 prompts, greedy, no EOS) against
            (a) a sampler that recomputes the whole sequence for every new token, as nanoGPT's
            generate does, and (b) Hugging Face's GPT2LMHeadModel.generate on the same weights
            (when transformers is installed), whose tokens must equal ours.
  logps     peak memory and time of forward + backward through selm.sequence_logps against
            log_softmax over every position's logits, on GPT-2's 50257-word vocabulary.
  train     tokens/s of a full SELM training step on GPT-2 124M and its model FLOPs
            utilisation against a large matmul's FLOP/s measured in the same run.

Every figure is printed as ours, baseline, ratio and target; the last line of the output is
one JSON object with every ratio and a description of the machine. Ratios are defined so
that the target says which way is better: speed-ups (baseline time / our time) should be
above it, memory and time fractions (ours / baseline) below it.

Timings are medians of a few repeats after a warm-up; where a baseline is too slow to run in
full, the output says how it was estimated. On a shared machine the numbers move with the
load: the header prints the load average, and ours and the baseline are interleaved so that
both see the same conditions.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from model import GPT, positions_from_mask, preset
from sample import generate
from selm import selm_loss, sequence_logps, split_logps

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


# ---- 1. sampling ----------------------------------------------------------------------------

def make_prompts(vocab_size, n=32, lo=8, hi=40, seed=0):
    """n prompts of random lengths in [lo, hi] and random tokens (id 0, the padding, unused)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(1, vocab_size, (n_tok,), generator=g).tolist() for n_tok in lengths]


def left_pad(prompts, device, pad_id=0):
    """(B, P) token ids and (B, P) 0/1 mask, every prompt ending in the last column."""
    P = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return idx.to(device), mask.to(device)


@torch.inference_mode()
def naive_step(model, idx, mask):
    """The recompute-everything sampler's one step: the whole left-padded sequence, with its
    mask and positions, through the model; the LM head at the last position only (as nanoGPT
    does at inference); greedy."""
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[:, -1] = True
    logits = model(idx, position_ids=positions_from_mask(mask), attention_mask=mask,
                   output_mask=last)
    return logits.argmax(-1)


@torch.inference_mode()
def naive_generate(model, prompts, max_new_tokens, device):
    idx, mask = left_pad(prompts, device)
    P = idx.shape[1]
    for _ in range(max_new_tokens):
        tok = naive_step(model, idx, mask)
        idx = torch.cat([idx, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return idx[:, P:].tolist()


def naive_estimate(model, prompts, max_new_tokens, device, args):
    """Seconds the naive sampler would take, from timing its step at three sequence lengths
    (the first, middle and last step) and summing the quadratic through them over every step.
    A step's cost is linear (matmuls) plus quadratic (attention) in the length, so three points
    pin it down; the quadratic term is small."""
    idx, mask = left_pad(prompts, device)
    P = idx.shape[1]
    g = torch.Generator().manual_seed(1)
    tail = torch.randint(1, model.config.vocab_size, (len(prompts), max_new_tokens), generator=g)
    idx = torch.cat([idx, tail.to(device)], 1)
    mask = torch.cat([mask, torch.ones_like(tail).to(device)], 1)
    xs = [P, P + max_new_tokens // 2, P + max_new_tokens - 1]
    with autocast(args, device):
        ys = [timed(lambda S=S: naive_step(model, idx[:, :S], mask[:, :S]), device)[0]
              for S in xs]

    def cost(s):  # Lagrange interpolation through the three measured steps
        total = 0.0
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            w = 1.0
            for j, xj in enumerate(xs):
                if j != i:
                    w *= (s - xj) / (xi - xj)
            total += w * yi
        return total
    return sum(cost(S) for S in range(P, P + max_new_tokens)), dict(zip(xs, ys))


# Hugging Face stores these as Conv1D, (in, out); our nn.Linear weights are (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_twin(model, device):
    """GPT2LMHeadModel with our model's dimensions and weights, or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    c = model.config
    cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size,
                                  n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                                  layer_norm_epsilon=c.layer_norm_epsilon, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                  eos_token_id=None, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg)
    sd = {k: (v.t() if k.endswith(HF_CONV1D) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or any(not k.endswith(".attn.bias") for k in missing):
        raise RuntimeError(f"weights do not map onto GPT2LMHeadModel: {missing} {unexpected}")
    return hf.to(device).eval()


def hf_generate(hf, prompts, max_new_tokens, device):
    import transformers
    idx, mask = left_pad(prompts, device)
    cfg = transformers.GenerationConfig(max_new_tokens=max_new_tokens,
                                        min_new_tokens=max_new_tokens, do_sample=False,
                                        num_beams=1, use_cache=True, pad_token_id=0,
                                        eos_token_id=None, bos_token_id=None)
    with torch.inference_mode():
        out = hf.generate(input_ids=idx, attention_mask=mask, generation_config=cfg)
    assert out.shape[1] == idx.shape[1] + max_new_tokens, "HF generated a different length"
    return out[:, idx.shape[1]:].tolist()


@torch.inference_mode()
def matmul_only_step(model, batch, device, repeats, args):
    """Seconds of the decode step's matmuls alone: every linear layer of the model and the LM
    head applied to a (batch, in) input, with nothing in between. Each product is timed both
    as x @ W^T and as (W @ x^T)^T (BLAS threads the two very differently) and the faster
    sweep counts: a lower bound for one decode step on this machine."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(batch, m.in_features, device=device) for m in layers}

    def x_wt():
        with autocast(args, device):
            for m in layers:
                F.linear(xs[m.in_features], m.weight, m.bias)

    def w_xt():
        with autocast(args, device):
            for m in layers:
                y = m.weight @ xs[m.in_features].t()
                if m.bias is not None:
                    y += m.bias[:, None]
    return min(compare({"x_wt": x_wt, "w_xt": w_xt}, device, repeats)[0].values())


def bench_sampling(args, device):
    B = 32
    lengths = (8, 32) if args.quick else (32, 128, 512)
    N = lengths[-1] if args.quick else 128  # where ours is compared with the baselines
    for name in ["small"] if args.quick else ["small", "gpt2"]:
        big = name == "gpt2"
        cfg = preset("gpt2") if big else preset("small", vocab_size=258, block_size=1024)
        model = random_model(cfg, device)
        prompts = make_prompts(cfg.vocab_size, n=B)
        reps = 1 if big else 3  # a gpt2 generate takes seconds: one timed run each
        header(f"sampling: {name} ({model.num_params() / 1e6:.1f}M params), batch {B}, "
               f"prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens, greedy, "
               f"no EOS")

        def ours(n):
            with autocast(args, device):
                return generate(model, prompts, n, temperature=0)[0]

        # warm-up, and a first check that the baselines decode what we decode
        hf = hf_twin(model, device)
        def naive(n):
            with autocast(args, device):
                return naive_generate(model, prompts, n, device)

        first_two_agree = naive(2) == ours(2)
        if hf is not None:
            hf_generate(hf, prompts, 2, device)

        # ours at N against the baselines, interleaved; then ours at the other lengths
        fns = {"ours": lambda: ours(N)}
        if hf is not None:
            fns["hf"] = lambda: hf_generate(hf, prompts, N, device)
        t, out = compare(fns, device, reps, warmup=0)
        t_ours = {N: t["ours"]}
        for n in (1,) + lengths:  # 1: the prefill and a first token, to separate out
            if n != N:
                t_ours[n] = compare({"ours": lambda n=n: ours(n)}, device, reps, warmup=0)[0]["ours"]

        report(f"{name} prefill", 1e3 * t_ours[1], None, "ms",
               note=f"generate(max_new_tokens=1): {B} left-padded prompts in one forward")
        n0 = lengths[0]
        per_token = {n: (t_ours[n] - t_ours[1]) / (n - 1) for n in lengths}
        for n in lengths:  # a KV cache keeps a new token's cost nearly flat in n
            report(f"{name} decode @{n}: ms/new token", 1e3 * per_token[n], 1e3 * per_token[n0],
                   "ms", note=f"{B * n / t_ours[n]:.0f} tok/s overall; decode = (t@{n} - t@1) / "
                              f"{n - 1}; baseline column and ratio: ours @{n0}")

        # (a) the recompute-everything sampler
        if big:
            est, steps = naive_estimate(model, prompts, N, device, args)
            note = ("estimated: its step timed at lengths " +
                    ", ".join(f"{s} ({v:.2f}s)" for s, v in steps.items()) +
                    f", the quadratic through them summed over {N} steps; first 2 tokens "
                    f"equal to ours: {first_two_agree}")
        else:
            est, naive_out = timed(lambda: naive(N), device)
            check, _ = naive_estimate(model, prompts, N, device, args)
            note = (f"run in full, once ({est:.2f}s); the 3-point estimate used for gpt2 says "
                    f"{check:.2f}s; tokens equal to ours: {naive_out == out['ours']}")
        report(f"{name} vs naive @{N}", B * N / t["ours"], B * N / est, "tok/s",
               target=5.0 if big else None, note=note)

        # (b) Hugging Face
        if hf is None:
            print("  (transformers not installed: no Hugging Face baseline)")
        else:
            a, b = out["ours"], out["hf"]
            same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (B * N)
            rows = sum(ra == rb for ra, rb in zip(a, b))
            report(f"{name} vs HF generate @{N}", B * N / t["ours"], B * N / t["hf"], "tok/s",
                   target=1.1 if big else 1.5,
                   note=f"tokens equal to HF's: {same:.3f}, rows identical {rows}/{B}; HF "
                        f"{hf.config._attn_implementation} attention, dynamic cache")
            RESULTS[f"{name} vs HF generate @{N}"]["token_match"] = same
            del hf

        # the decode step against its own matmuls
        mm = matmul_only_step(model, B, device, 3 if big else 10, args)
        step = (t_ours[N] - t_ours[1]) / (N - 1)
        report(f"{name} decode step / its matmuls", 1e3 * step, 1e3 * mm, "ms", better="lower",
               note=f"mean decode step @{N}; matmuls: every linear layer and the LM head on a "
                    f"({B}, C) input, the faster of two orientations")
        del model


# ---- 2. log-probs ---------------------------------------------------------------------------

def naive_logps(model, input_ids, response_mask):
    """log_softmax over the logits of every position, then gather and a masked sum."""
    logp = model(input_ids).float().log_softmax(-1)[:, :-1]  # [B, T-1, V]
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (tok * response_mask[:, 1:]).sum(1)


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


def bench_logps(args, device):
    B, T = (4, 128) if args.quick else (8, 256)
    cfg = preset("small", vocab_size=50257, block_size=T)
    model = random_model(cfg, device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
    resp = torch.zeros(B, T, dtype=torch.long, device=device)
    resp[:, T // 2:] = 1  # the second half of every row is the response
    header(f"log-probs: forward + backward, {B} rows x {T} tokens (half response), vocab "
           f"{cfg.vocab_size}, model {model.num_params() / 1e6:.1f}M params")

    def run(f):
        def go():
            model.zero_grad(set_to_none=True)
            with autocast(args, device):
                lp = f(model, ids, resp)
            lp.sum().backward()
        return go

    fns = {"ours": run(sequence_logps), "naive": run(naive_logps)}
    t = compare(fns, device, repeats=3 if args.quick else 5)[0]
    mem = {k: peak_memory(fn, device) for k, fn in fns.items()}
    with torch.no_grad():
        diff = (sequence_logps(model, ids, resp) - naive_logps(model, ids, resp)).abs().max().item()
    report("logps peak memory", mem["ours"] / 2**20, mem["naive"] / 2**20, "MiB", target=0.5,
           better="lower", note=f"allocator peak above start, grads included; max |ours - naive| "
                               f"log-prob {diff:.1e}")
    report("logps time (fwd+bwd)", 1e3 * t["ours"], 1e3 * t["naive"], "ms", target=1.0,
           better="lower")


# ---- 3. the training step -------------------------------------------------------------------

def matmul_peak(device, args):
    """FLOP/s of one large matmul: the machine's practical ceiling for what training does."""
    n = 2048 if device.type == "cpu" else 8192
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = compare({"mm": lambda: a @ b}, device, repeats=5)[0]["mm"]
    return 2 * n**3 / t, n


def bench_train(args, device):
    name = "small" if args.quick else "gpt2"
    cfg = preset("small", vocab_size=258, block_size=1024) if args.quick else preset("gpt2")
    rows, T = 4, 128
    model = random_model(cfg, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (3 * rows, T), generator=g).to(device)
    resp = torch.zeros(3 * rows, T, dtype=torch.long, device=device)
    resp[:, T // 2:] = 1
    with torch.no_grad(), autocast(args, device):  # the reference's log-probs: constants
        ref_c, ref_r, ref_y = split_logps(sequence_logps(model, ids, resp), 3)
    header(f"training step: {name} ({model.num_params() / 1e6:.1f}M params), [chosen; rejected; "
           f"y_ref] = 3 x {rows} rows x {T} tokens (half response), AdamW")

    def step():
        with autocast(args, device):
            pc, pr, py = split_logps(sequence_logps(model, ids, resp), 3)
            losses, _, _ = selm_loss(pc, pr, ref_c, ref_r, py, ref_y, beta=0.1, alpha=1e-3)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = compare({"step": step}, device, repeats=2)[0]["step"]
    peak, n = matmul_peak(device, args)
    tokens = 3 * rows * T
    achieved = model.flops_per_token(T) * tokens / t
    report(f"{name} train step", tokens / t, None, "tok/s",
           note=f"{t:.2f}s per step of {tokens} tokens")
    report(f"{name} train MFU", achieved / 1e9, peak / 1e9, "GFLOP/s", target=0.5,
           note=f"model FLOPs (model.flops_per_token) / a {n}^3 matmul's FLOP/s; the LM head "
                f"runs at the response positions only, so fewer FLOPs than counted are executed")


# Section 4 (the pipeline breakdown: sampling, judging, scoring, updating of one SELM
# iteration) registers itself here.
def bench_pipeline(args, device):
    """Where one SELM iteration of the `small` pipeline spends its time: sampling, judging,
    reference log-probs, training (train.py measures each part and logs it). The SFT model
    is trained for fewer steps than the default: the breakdown of an iteration depends on
    the sizes, not on how good the model is."""
    import tempfile

    import train
    header("one SELM iteration of the small pipeline (train.py, 1024 prompts)")
    steps = "50" if args.quick else "300"
    with tempfile.TemporaryDirectory() as out, _stderr_silenced():
        cfg = train.parse_args(["--model", "small", "--sft-steps", steps, "--iterations", "1",
                                "--device", device.type, "--out-dir", out]
                               + (["--chunk-size", "256", "--n-eval", "64"] if args.quick else []))
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            train.run(cfg)
        info = [r["online"] for r in train.read_metrics(f"{out}/metrics.jsonl") if "online" in r][-1]
    parts = {"sampling": info["t_sample"], "judging": info["t_judge"],
             "reference log-probs": info["t_ref_logps"], "training": info["t_train"]}
    total = sum(parts.values())
    for name, sec in parts.items():
        target = 0.5 if name == "sampling" else None
        report(f"iteration: {name}", 100 * sec / total, None, "% of wall", ratio=sec / total,
               target=target, better="lower", note=f"{sec:.2f} s of {total:.2f} s")


SECTIONS = {"sampling": bench_sampling, "logps": bench_logps, "train": bench_train,
            "pipeline": bench_pipeline}


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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark selm's sampler, log-probs and training "
                                             "step against baselines timed in the same run.")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, from: {', '.join(SECTIONS)}")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test in seconds")
    ap.add_argument("--bf16", action="store_true", help="run ours and the baselines under bf16 "
                                                        "autocast (meant for CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, for us and baselines

    info = machine(device)
    print("selm bench: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    busy_warning(info)
    t0 = time.perf_counter()
    for s in sections:
        SECTIONS[s](args, device)
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.0f}s", flush=True)
    busy_warning(machine(device), own_load=torch.get_num_threads() if device.type == "cpu" else 1)
    targets = {k: {"ratio": v["ratio"], "target": v["target"],
                   "met": (v["ratio"] >= v["target"]) if v["better"] == "higher"
                   else (v["ratio"] <= v["target"])}
               for k, v in RESULTS.items() if v["target"] is not None}
    print(json.dumps({"ratios": {k: v["ratio"] for k, v in RESULTS.items() if v["ratio"] is not None}, "targets": targets,
                      "machine": machine(device), "quick": args.quick, "bf16": args.bf16,
                      "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    sys.exit(main())
