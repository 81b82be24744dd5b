"""
roofline.py -- perf.bench's roofline section (--sections roofline --init-from DIR): each hot path
of a SELM iteration on a real model, in fp32 and in bf16, against this machine's own ceilings.

    python -m perf.bench --sections roofline --init-from models/SmolLM2-135M-Instruct --threads 2

The hot paths, at the instruction recipe's shapes (random tokens of its lengths; the weights are
the model's):
  prefill        the sampler's prefill of 64 prompts of 47-103 tokens
  decode step    one step of the sampler at 64 rows, about 100 slots of cache written
  ref log-probs  the reference's log-probs of 4 examples (prompt + chosen, rejected, y_ref: one
                 row each, data.collate_shared), no grad
  train step     the same batch forward and backward through the SELM loss, and AdamW's step
  SELM iteration train.selm_iteration on 32 conversational prompts (perf/real.py's data):
                 sampling, judging, reference log-probs and the epoch, by wall time
Sampling runs as the sampler does (a bf16 copy of the weights, sampler.in_dtype), the rest under
bf16 autocast with fp32 weights, as train.py does.

For each: the seconds (median of interleaved rounds), the FLOPs it executes (counted by torch's
FlopCounterMode: every matmul and attention, the LM head only where it runs), their rate, and
the peak: the rate of the very matmuls it executes (recorded as it runs: each shape and how
often) run alone, back to back, on random inputs, in its dtype. share = rate / peak. A path
bound by memory rather than arithmetic, like a decode step that reads every weight for a few
rows, shows a low share: for it the bytes it must read (weights and KV cache) per second are
printed against the machine's bandwidth (a large copy).
"""

import copy
import os
import statistics
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop, sdpa_flop

from perf.measure import header, report, silenced, timed

aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)

# FlopCounterMode counts the GPU's fused attention kernels; a CPU runs attention through these
@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs):
    return sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape)


COMPOSITE = (aten.linear.default, aten.matmul.default)  # under inference mode they reach a mode whole


class Matmuls(TorchDispatchMode):
    """The matmuls a piece of code executes: {(op, shapes of its matrices, dtype): how often}."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in COMPOSITE:  # into the mm / bmm they run, as FlopCounterMode takes them apart
            with self:
                out = func.decompose(*args, **(kwargs or {}))
            if out is not NotImplemented:
                return out
        if func in MATMULS:
            a, b = args[-2:] if func in (aten.addmm.default, aten.baddbmm.default) else args[:2]
            key = (func, tuple(a.shape), tuple(b.shape), a.dtype)
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def counted(fn):
    """(FLOPs fn executes, the Matmuls it runs), from one run."""
    flops, mats = FlopCounterMode(display=False), Matmuls()
    with flops, mats:
        fn()
    return flops.get_total_flops(), mats.calls


def matmul_peak(calls, reps=3):
    """FLOP/s of exactly these matmuls (Matmuls.calls) run alone on random inputs: the
    machine's ceiling for the path that ran them."""
    total_flops = total_time = 0.0
    for (op, a_shape, b_shape, dtype), n in calls.items():
        a, b = torch.randn(a_shape).to(dtype), torch.randn(b_shape).to(dtype)
        mm = torch.bmm if len(a_shape) == 3 else torch.mm
        mm(a, b)
        best = min(timed(lambda: mm(a, b), torch.device("cpu"))[0] for _ in range(reps))
        total_flops += n * 2 * a.numel() * b_shape[-1]
        total_time += n * best
    return total_flops / total_time


def bandwidth():
    """Bytes per second a large copy moves (read and write), the ceiling of a path bound by memory."""
    a = torch.ones(64 << 20)  # 256 MB, touched: untouched pages read as zeros from a cache
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() * 4 / min(timed(lambda: b.copy_(a), torch.device("cpu"))[0] for _ in range(3))


# ---- the hot paths -------------------------------------------------------------------------------

def recipe_batch(vocab, n_examples=4, seed=0):
    """Examples of the recipe's lengths: a prompt of 60-80 tokens, chosen, rejected and one y_ref
    of 40-48 (random ids)."""
    from data import Example
    g = torch.Generator().manual_seed(seed)
    ids = lambda lo, hi: torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (), generator=g)),),  # noqa: E731
                                       generator=g).tolist()
    return [Example(ids(60, 80), ids(40, 48), ids(40, 48), (ids(40, 48),)) for _ in range(n_examples)]


def hot_paths(model, dtype, quick):
    """{name: (fn, bytes it must move or None)} of the four hot paths on `model`, computing in
    `dtype` (None: fp32). Each fn leaves the model's weights as it found them."""
    from data import collate_shared
    from runtime import Ranks, Runtime
    from training import adamw
    from sampler import StaticCache, decode_step, in_dtype, next_token, prefill, reads_whole_cache
    from selm import selm_loss, shared_logps, split_logps
    cpu, V = torch.device("cpu"), model.config.vocab_size
    rt = Runtime(cpu, dtype, Ranks(), None)
    n_rows, steps = (8, 4) if quick else (64, 24)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(47, 104, (n_rows,), generator=g)
    idx = torch.randint(3, V, (n_rows, int(lengths.max())), generator=g)
    mask = torch.arange(idx.shape[1]) >= idx.shape[1] - lengths[:, None]  # left padding
    net = in_dtype(model, dtype)
    wdtype = net.transformer.wte.weight.dtype
    whole = reads_whole_cache(cpu, wdtype)
    P = idx.shape[1]
    cache = StaticCache(net.config, n_rows, P + steps + 1, cpu, wdtype)

    @torch.inference_mode()
    def fill():
        return next_token(prefill(net, idx, mask, cache), 0, None, None)
    tok = fill()
    with torch.inference_mode():
        for t in range(steps - 1):  # the cache about as full as a decode step's in the middle of an answer
            tok = next_token(decode_step(net, tok, cache, None if whole else P + t + 1), 0, None, None)

    slot, pos = cache.slot.clone(), cache.pos.clone()

    @torch.inference_mode()
    def step():  # the same step every time: the slot and positions put back
        cache.slot.copy_(slot)
        cache.pos.copy_(pos)
        return next_token(decode_step(net, tok, cache, None if whole else P + steps), 0, None, None)
    per = lambda t: t.element_size() * t.numel()  # noqa: E731
    step_bytes = sum(per(p) for p in net.parameters()) + sum(per(k[:, :, :P + steps]) for k in cache.k + cache.v)

    batch = collate_shared(recipe_batch(V), 0)
    ref = torch.zeros(3, len(batch["input_ids"]))

    @torch.no_grad()
    def ref_logps():
        with rt.autocast():
            model.eval()
            out = shared_logps(model, batch, 3)
            model.train()
            return out
    opt = adamw(model.parameters(), rt, lr=0.0)  # lr 0: the weights stay as they are

    def train_step():
        with rt.autocast():
            w, l, y = split_logps(shared_logps(model, batch, 3), 3)
            losses, *_ = selm_loss(w, l, ref[0], ref[1], y, ref[2], beta=0.1, alpha=0.03)
        losses.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"prefill": (fill, None), "decode step": (step, step_bytes), "ref log-probs": (ref_logps, None),
            "train step": (train_step, None)}


def iteration(args, dtype_name, d, data_args):
    """fn running one SELM iteration of train.py (train.selm_iteration) on a fresh copy of the
    weights, silenced: 32 prompts, greedy answers of up to 48 tokens, batch 4."""
    import train
    from inputs import build_model, check_config, tokenizer_and_data
    from runtime import setup
    cfg = train.parse_args(["--init-from", args.init_from, *data_args, "--sft-steps", "0", "--iterations", "1",
                            "--batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "8" if args.quick
                            else "48", "--block-size", "512", "--device", "cpu", "--dtype", dtype_name,
                            "--out-dir", os.path.join(d, dtype_name)])
    check_config(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    rt = setup(cfg.device, cfg.dtype, cfg.out_dir)
    with silenced():
        tok, data = tokenizer_and_data(cfg, rt)
        model = build_model(cfg, tok, rt)

    def run():
        with silenced():
            train.selm_iteration(rt, cfg, tok, 1, copy.deepcopy(model), data.chunks[1], data.judge)
    return run


def bench_roofline(args, device):
    from hf import load_pretrained
    from perf.real import chat_pairs, write_data
    if device.type != "cpu":
        print("  (the roofline section measures a CPU; see docs/speed.md for the GPU)")
        return
    rounds = 1 if args.quick else 3
    model = load_pretrained(args.init_from).train()
    header(f"roofline: {args.init_from} ({model.num_params() / 1e6:.0f}M params), the recipe's shapes, "
           f"fp32 and bf16; {torch.get_num_threads()} threads")
    bw = bandwidth()
    print(f"  memory bandwidth (a 256 MB copy): {bw / 1e9:.1f} GB/s", flush=True)
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    paths = {name: hot_paths(model, dt, args.quick) for name, dt in dtypes.items()}
    with tempfile.TemporaryDirectory() as d:
        data_args = write_data(d, chat_pairs(16 if args.quick else 64, most=1 if args.quick else 8))
        for name in dtypes:
            paths[name]["SELM iteration"] = (iteration(args, {"fp32": "float32", "bf16": "bfloat16"}[name], d,
                                                       data_args), None)
        for path in paths["fp32"]:
            counts = {name: counted(paths[name][path][0]) for name in dtypes}  # also the warm-up
            times = {name: [] for name in dtypes}
            for _ in range(rounds):  # interleaved
                for name in dtypes:
                    times[name].append(timed(paths[name][path][0], device)[0])
            for name in dtypes:
                (flops, calls), nbytes = counts[name], paths[name][path][1]
                t = statistics.median(times[name])
                rate, peak = flops / t, matmul_peak(calls)
                memory = nbytes and f"; reads {nbytes / t / 1e9:.1f} GB/s, {nbytes / t / bw:.0%} of the bandwidth"
                report(f"roofline: {path} {name}", rate / 1e9, peak / 1e9, "GFLOP/s", ratio=rate / peak,
                       target=0.3 if (path, name) == ("train step", "bf16") else None,
                       note=f"{t:.3f} s, {flops / 1e9:.1f} GFLOP; peak: its matmuls alone{memory or ''}")
            ratio = statistics.median(a / b for a, b in zip(times["fp32"], times["bf16"]))
            print(f"  {path}: bf16 {ratio:.2f}x as fast as fp32", flush=True)
