"""
bench.py -- how fast selm's hot paths are, each against a baseline timed in the same run.

    python -m perf.bench                                   # every section, default sizes
    python -m perf.bench --sections sampling --shapes gpt2-w4,qwen2-0.5b
    python -m perf.bench --sections sampling --shapes qwen2-0.5b --device cuda
    python -m perf.bench --quick                           # a smoke test: toy sizes, under a minute
    python -m perf.bench --sections real --init-from smollm2   # a real chat model (perf/real.py)
    python -m perf.bench --sections roofline --init-from smollm2   # its hot paths against the machine's peaks

Sections (all but real on random-weight models; no data, no checkpoint):
  sampling  (perf/sampling.py) per shape (d256, gpt2-w4, gpt2, qwen2-0.5b; --shapes): tokens/s
            of sampler.generate, eager and compiled, on a ragged batch, greedy, no EOS, against
            Hugging Face's generate on the same weights (its tokens must equal ours), and for
            d256 and gpt2 against a sampler that recomputes the whole sequence for every new
            token, as nanoGPT's generate does; the compiled step's compile time; the decode
            step against its own matmuls. Qwen2-0.5B's shapes at 4 of its 24 layers on a CPU
            (--qwen2-layers).
  next-token  choosing a token at temperature 1 from a batch of logits at GPT-2's and
            Qwen2's vocabularies: sampler.next_token against torch.multinomial.
  logps     peak memory and time of forward + backward through selm.sequence_logps against
            log_softmax over every position's logits, on GPT-2's 50257-word vocabulary and
            Qwen2's 151936.
  train     tokens/s of a full SELM training step on GPT-2 124M and its model FLOPs
            utilisation against a large matmul's FLOP/s measured in the same run.
  pipeline  where one SELM iteration of the small pipeline spends its time.
  real      (perf/real.py; only when named, with --init-from DIR) on a real chat model: a DPO
            epoch against TRL's DPOTrainer (pairs/s, peak memory), greedy chat answers against
            transformers' generate, and where a SELM iteration's time goes.
  roofline  (perf/roofline.py; only when named, with --init-from DIR) each hot path of a SELM
            iteration on a real model (prefill, a decode step, reference log-probs, a training
            step, a whole iteration), fp32 and bf16: FLOP/s against the machine's own matmul
            peak at the path's shapes, and a decode step's bytes against its memory bandwidth.
--profile-step, instead of the sections: the profiler's time per operator of the eager decode
step, per --shapes (default gpt2-w4).

Every figure is printed as ours, baseline, ratio and target; the last line of the output is
one JSON object with every ratio and a description of the machine. Ratios are defined so
that the target says which way is better: speed-ups (baseline time / our time) should be
above it, memory and time fractions (ours / baseline) below it.

A ratio comes from at least 3 rounds in which ours and the baseline run interleaved (after a
warm-up): it is the median of the per-round ratios, printed with their range, and marked
TOO WIDE TO TRUST when that range exceeds a tenth of it. Where a baseline is too slow to run
in full, the output says how it was estimated. On a shared machine the numbers move with the
load: the header prints the load average, with a warning when other processes are busy.
Compile time is a figure of its own, never inside a tokens/s figure.
"""


import argparse
import json
import os
import sys
import time

import torch

from perf.real import bench_real
from perf.roofline import bench_roofline
from perf.sampling import SHAPES, bench_next_token, bench_sampling, profile_step
from perf.measure import (RESULTS, autocast, busy_warning, compare, header, machine, peak_memory, random_model,
                          report, report_iteration, selm_iteration_times)
from commands import one_line_errors
from model import preset
from runtime import check_device
from selm import selm_loss, sequence_logps, split_logps


# ---- 2. log-probs ---------------------------------------------------------------------------

def naive_logps(model, input_ids, response_mask):
    """log_softmax over the logits of every position, then gather and a masked sum."""
    logp = model(input_ids).float().log_softmax(-1)[:, :-1]  # [B, T-1, V]
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (tok * response_mask[:, 1:]).sum(1)



def bench_logps(args, device):
    # GPT-2's vocabulary, and the Llama family's larger ones (Qwen2: 151936), where the naive
    # [B, T, V] log-softmax is 3x larger again
    for V in (50257, 151936):
        bench_logps_at(args, device, V)


def bench_logps_at(args, device, V):
    B, T = (4, 128) if args.quick else (8, 256) if V <= 50257 else (4, 256)
    cfg = preset("small", vocab_size=V, block_size=T)
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
    r, spread = t.ratio("ours", "naive")
    mem = {k: peak_memory(fn, device) for k, fn in fns.items()}
    with torch.no_grad():
        diff = (sequence_logps(model, ids, resp) - naive_logps(model, ids, resp)).abs().max().item()
    report(f"logps peak memory V={V}", mem["ours"] / 2**20, mem["naive"] / 2**20, "MiB", target=0.5,
           better="lower", note=f"allocator peak above start, grads included; max |ours - naive| "
                               f"log-prob {diff:.1e}")
    report(f"logps time (fwd+bwd) V={V}", 1e3 * t["ours"], 1e3 * t["naive"], "ms", target=1.0,
           better="lower", ratio=r, spread=spread)



# ---- 3. the training step -------------------------------------------------------------------

def big_matmul(device, args):
    """One large matmul, (fn, its FLOPs, n): the machine's practical ceiling for what training
    does."""
    n = 2048 if device.type == "cpu" else 8192
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n**3, n


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

    mm, mm_flops, n = big_matmul(device, args)
    times = compare({"step": step, "mm": mm}, device, repeats=3)[0]
    t = times["step"]
    tokens = 3 * rows * T
    flops = model.flops_per_token(T) * tokens
    r, spread = times.ratio("mm", "step")  # achieved FLOP/s / peak = (flops / t_step) / (mm_flops / t_mm)
    report(f"{name} train step", tokens / t, None, "tok/s",
           note=f"{t:.2f}s per step of {tokens} tokens")
    report(f"{name} train MFU", flops / t / 1e9, mm_flops / times["mm"] / 1e9, "GFLOP/s", target=0.5,
           ratio=r * flops / mm_flops, spread=tuple(x * flops / mm_flops for x in spread),
           note=f"model FLOPs (model.flops_per_token) / a {n}^3 matmul's FLOP/s; the LM head "
                f"runs at the response positions only, so fewer FLOPs than counted are executed")


# Section 4 (the pipeline breakdown: sampling, judging, scoring, updating of one SELM
# iteration) registers itself here.
def bench_pipeline(args, device):
    """Where one SELM iteration of the `small` pipeline spends its time: sampling, judging,
    reference log-probs, training (train.py measures each part and logs it). The SFT model
    is trained for fewer steps than the default: the breakdown of an iteration depends on
    the sizes, not on how good the model is."""
    header("one SELM iteration of the small pipeline (train.py, 1024 prompts)")
    steps = "50" if args.quick else "300"
    info = selm_iteration_times(["--model", "small", "--sft-steps", steps, "--iterations", "1", "--device", device.type]
                                + (["--chunk-size", "256", "--n-eval", "64"] if args.quick else []))
    report_iteration(info, "iteration")


SECTIONS = {"sampling": bench_sampling, "next-token": bench_next_token, "logps": bench_logps,
            "train": bench_train, "pipeline": bench_pipeline, "real": bench_real, "roofline": bench_roofline}
REAL = ("real", "roofline")  # the real model's sections run when named, with --init-from
DEFAULT = [s for s in SECTIONS if s not in REAL]



def parser():
    ap = argparse.ArgumentParser(prog="python -m perf.bench",
                                 description="Benchmark selm's sampler, log-probs and training "
                                             "step against baselines timed in the same run.")
    ap.add_argument("--sections", default=",".join(DEFAULT),
                    help=f"comma-separated, from: {', '.join(SECTIONS)} (default: all but real and roofline)")
    ap.add_argument("--init-from", default=None,
                    help="real: a Hugging Face chat model directory (python -m tools.gguf_to_hf --smollm2 DIR)")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes: a smoke test, under a minute")
    ap.add_argument("--bf16", action="store_true", help="run ours and the baselines in bf16 (autocast; "
                                                        "real: train.py's bfloat16 against TRL's bf16=True)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--shapes", default=None,
                    help=f"sampling: comma-separated, from: {', '.join(SHAPES)} (default all)")
    ap.add_argument("--qwen2-layers", type=int, default=None,
                    help="depth of the Qwen2-0.5B-shaped model (default: 24 on CUDA, 4 on a CPU)")
    ap.add_argument("--profile-step", action="store_true",
                    help="instead: where the eager decode step's time goes, per operator, "
                         "for --shapes (default gpt2-w4)")
    return ap


def check_args(args):
    """Every flag checked, in one line naming it, before anything runs."""
    for flag, given, valid in (("--sections", args.sections, SECTIONS), ("--shapes", args.shapes, SHAPES)):
        names = [s.strip() for s in (given or "").split(",") if s.strip()]
        unknown = [s for s in names if s not in valid]
        if unknown or (given is not None and not names):
            raise ValueError(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; valid: {', '.join(valid)}")
    for flag, n in (("--threads", args.threads), ("--qwen2-layers", args.qwen2_layers)):
        if n is not None and n < 1:
            raise ValueError(f"{flag} must be at least 1, got {n}")
    if args.init_from is not None and not os.path.isfile(os.path.join(args.init_from, "config.json")):
        raise ValueError(f"--init-from {args.init_from!r}: not a Hugging Face model directory (no config.json)")
    named = [s for s in REAL if s in [s.strip() for s in args.sections.split(",")]]
    if named and args.init_from is None:
        raise ValueError(f"--sections {named[0]} needs --init-from DIR, a Hugging Face chat model directory "
                         "(python -m tools.gguf_to_hf --smollm2 DIR makes one)")
    check_device(args.device)


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        return bench(args)


def bench(args):
    """The sections args names, timed; then every ratio against its target, as one JSON line."""
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
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
    if args.profile_step:
        return profile_step(args, device)
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
    ratios = {k: v["ratio"] for k, v in RESULTS.items() if v["ratio"] is not None}
    print(json.dumps({"ratios": ratios, "targets": targets,
                      "machine": machine(device), "quick": args.quick, "bf16": args.bf16,
                      "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    sys.exit(main())
