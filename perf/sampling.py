"""
sampling.py -- perf.bench's sampling section: tokens/s of sampler.generate, eager and
compiled, against Hugging Face's generate on the same weights and against a sampler that
recomputes everything; the decode step against its own matmuls; compile time.

Shapes (random weights; --shapes picks some):
  d256        6 layers of width 256, a 260-word vocabulary: a small model, bound by overheads
  gpt2-w4     GPT-2's width and vocabulary, 4 layers
  gpt2        GPT-2 124M
  qwen2-0.5b  Qwen2-0.5B's shapes (GQA, 151936-word vocabulary); 4 of its 24 layers on a CPU
The batch is ragged (prompts of 8-40 tokens, left-padded), decoding greedy with no EOS, so
every sampler produces the same number of tokens and, where the weights agree, the same
tokens: the benchmark checks that they do before it trusts a timing. Every ratio is the
median over interleaved rounds, with its spread (measure.py).
"""

import torch
import torch.nn.functional as F

from perf.measure import RESULTS, autocast, compare, header, random_model, report, sync, timed
from model import GPTConfig, positions_from_mask, preset
from sampler import (StaticCache, bucket, compile_seconds, compiled_decode_step, decode_step, generate,
                    next_token, prefill)


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


def qwen2_config(n_layer=24, **overrides):
    """Qwen2-0.5B's shapes (random weights here): a 151936-word vocabulary, width 896, 14 query
    heads sharing 2 K/V heads of 64, SwiGLU 4864 wide, q/k/v biases, a tied head, rope base 1e6.
    Depth 24 in full; the benchmark may cut it on a CPU (the LM head's cost is depth's alone)."""
    return GPTConfig(**{**dict(model_type="qwen2", vocab_size=151936, n_embd=896, n_head=14,
                               n_kv_head=2, head_dim=64, n_inner=4864, qkv_bias=True,
                               tie_embeddings=True, rope_theta=1e6, layer_norm_epsilon=1e-6,
                               n_layer=n_layer, block_size=32768), **overrides})


def hf_twin(model, device):
    """The transformers model of our model's family (GPT-2, Llama, Qwen2, ...), with its
    dimensions and weights, built from hf.py's config.json and state dict; None without
    transformers."""
    try:
        import transformers
    except ImportError:
        return None
    from hf import hf_config, ours_to_hf
    transformers.logging.set_verbosity_error()
    cfg = hf_config(model.config)
    cfg.update(pad_token_id=0, bos_token_id=None, eos_token_id=None)  # no EOS: fixed lengths
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    missing, unexpected = hf.load_state_dict(ours_to_hf(model), strict=False)
    tied = ["lm_head.weight"] if model.config.tie_embeddings else []
    if unexpected or [k for k in missing if k not in tied and not k.endswith(".attn.bias")]:
        raise RuntimeError(f"weights do not map onto {type(hf).__name__}: {missing} {unexpected}")
    hf.tie_weights()  # a tied head shares the embedding we loaded
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


def matmul_floor(model, batch, device, args):
    """The decode step's matmuls alone: every linear layer of the model and the LM head applied
    to a (batch, in) input, with nothing in between, as two fns: x @ W^T and (W @ x^T)^T
    (BLAS threads the two very differently). The faster, round by round, is a lower bound
    for one decode step on this machine."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(batch, m.in_features, device=device) for m in layers}

    @torch.inference_mode()
    def x_wt():
        with autocast(args, device):
            for m in layers:
                F.linear(xs[m.in_features], m.weight, m.bias)

    @torch.inference_mode()
    def w_xt():
        with autocast(args, device):
            for m in layers:
                if m.bias is None:
                    m.weight @ xs[m.in_features].t()
                else:
                    torch.addmm(m.bias[:, None], m.weight, xs[m.in_features].t())
    return {"x @ W^T": x_wt, "W @ x^T": w_xt}


def decode_loop(model, prompts, max_new_tokens, n_steps, device, args, compiled):
    """A fn that runs n_steps greedy decode steps as generate(prompts, max_new_tokens) does
    (the step and the argmax choosing the next token, on the same cache), from the same state
    every time: the prompts prefilled once, beforehand. Eager: a cache of exactly the slots
    needed; compiled: the bucket's, and its compiled step."""
    B, dtype = len(prompts), model.transformer.wte.weight.dtype
    idx, mask = left_pad(prompts, device)
    P, need = idx.shape[1], idx.shape[1] + max_new_tokens
    if compiled:
        step, cache, _ = compiled_decode_step(model, B, min(bucket(need), model.config.block_size),
                                              dtype, device)
    else:
        step, cache = decode_step, StaticCache(model.config, B, need, device, dtype)
    with torch.inference_mode(), autocast(args, device):
        first = prefill(model, idx, mask.bool(), cache).argmax(-1)

    @torch.inference_mode()
    def run():
        cache.mask[:, P:] = False
        cache.slot.fill_(P)
        cache.pos.copy_(mask.sum(1))
        tok = first
        with autocast(args, device):
            for t in range(n_steps):  # eager reads the slots written so far, as generate does
                logits = step(model, tok, cache) if compiled else step(model, tok, cache, P + t + 1)
                tok = logits.argmax(-1)
        return tok
    return run


SHAPES = ("d256", "gpt2-w4", "gpt2", "qwen2-0.5b")


def shape(name, args, device):
    """(config, batch, new tokens, target against HF generate, note) of a benchmark shape."""
    if name == "d256":
        return GPTConfig(n_layer=6, n_head=8, n_embd=256, vocab_size=260, block_size=1024), 32, 128, 1.4, ""
    if name == "gpt2-w4":
        return preset("gpt2", n_layer=4), 16, 128, 1.35, ""
    if name == "gpt2":
        return preset("gpt2"), 32, 128, 1.3, ""
    if name == "qwen2-0.5b":
        depth = args.qwen2_layers or (24 if device.type == "cuda" else 4)
        note = "full depth" if depth == 24 else f"{depth} of Qwen2-0.5B's 24 layers"
        return qwen2_config(depth), 32, 128, 1.2, note
    if name == "small":  # --quick: the same code paths at toy sizes
        return preset("small", vocab_size=258, block_size=1024), 32, 32, 1.4, "toy"
    if name == "qwen2-toy":
        return qwen2_config(2, vocab_size=1000, n_embd=128, n_head=4, n_kv_head=2, head_dim=32,
                            n_inner=256, block_size=256), 8, 16, 1.2, "toy"
    raise ValueError(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")


def bench_sampling(args, device):
    names = ["small", "qwen2-toy"] if args.quick else \
        [s.strip() for s in (args.shapes or ",".join(SHAPES)).split(",") if s.strip()]
    for name in names:
        bench_shape(name, args, device)


def bench_next_token(args, device, B=32):
    """Choosing the next token at temperature 1 from (B, V) logits: sampler.next_token (the
    inverse of the running sum) against torch.multinomial over the softmax, at GPT-2's and
    Qwen2's vocabularies. Outside every tokens/s figure above, which decode greedily."""
    header(f"next-token sampling at temperature 1, batch {B}, no top-k or top-p")
    for V in ((1000,) if args.quick else (50257, 151936)):
        logits = torch.randn(B, V, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        fns = {"ours": lambda: next_token(logits, 1.0, None, None, torch.rand(B, 1, generator=g, device=device)),
               "multinomial": lambda: torch.multinomial(logits.softmax(-1), 1, generator=g)}
        t, _ = compare(fns, device, 5 if args.quick else 20)
        ratio, spread = t.ratio("multinomial", "ours")
        report(f"next token V={V}", t["ours"] * 1e3, t["multinomial"] * 1e3, "ms", ratio=ratio, spread=spread,
               note="the same distribution; the speed-up is multinomial's time / ours")


def profile_step(args, device, warm=60, n_steps=20):
    """Where the eager decode step's time goes (bench.py --profile-step): per shape, the
    profiler's time per step of each operator over n_steps greedy steps, after `warm` steps
    (so that about warm + 25 tokens are cached), as generate runs them."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = device.type == "cuda"
    for name in [s.strip() for s in (args.shapes or "gpt2-w4").split(",") if s.strip()]:
        cfg, B, _, _, note = shape(name, args, device)
        model = random_model(cfg, device)
        idx, mask = left_pad(make_prompts(cfg.vocab_size, n=B), device)
        P = idx.shape[1]
        cache = StaticCache(cfg, B, P + warm + n_steps, device, model.transformer.wte.weight.dtype)
        with torch.inference_mode(), autocast(args, device):
            tok = prefill(model, idx, mask.bool(), cache).argmax(-1)
            for t in range(warm):
                tok = decode_step(model, tok, cache, P + t + 1).argmax(-1)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
            with profile(activities=acts) as prof:
                for t in range(warm, warm + n_steps):
                    tok = decode_step(model, tok, cache, P + t + 1).argmax(-1)
                sync(device)
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
        total = sum(getattr(e, key, 0) for e in ops) / n_steps / 1e3  # ms per step
        print(f"\n== decode step profile: {name}{' (' + note + ')' if note else ''}, batch {B}, {P + warm} to "
               f"{P + warm + n_steps} cached tokens, eager: {total:.2f} ms of {'GPU' if on_gpu else 'CPU'} "
               "time per step")
        print(f"  {'operator':28s} {'calls/step':>10s} {'ms/step':>9s} {'share':>7s}")
        for e in ops[:12]:
            ms = getattr(e, key, 0) / n_steps / 1e3
            print(f"  {e.key:28s} {e.count / n_steps:10.0f} {ms:9.3f} {ms / total:7.1%}")


def bench_shape(name, args, device):
    cfg, B, N, target, note = shape(name, args, device)
    model = random_model(cfg, device)
    prompts = make_prompts(cfg.vocab_size, n=B)
    reps = 3
    header(f"sampling: {name} ({model.num_params() / 1e6:.1f}M params{', ' + note if note else ''}), "
           f"batch {B}, prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
           f"{N} new tokens, greedy, no EOS")
    note = f"{note}; " if note else ""

    def ours(n, compile=False):
        with autocast(args, device):
            return generate(model, prompts, n, temperature=0, compile=compile)[0]

    # compiling: the first call of a new bucket, timed on its own (never inside a tok/s figure)
    compiled = compile_seconds(model)
    t_first, _ = timed(lambda: ours(N, compile=True), device)
    t_compile = compile_seconds(model) - compiled

    hf = hf_twin(model, device)
    fns = {"eager": lambda: ours(N), "compiled": lambda: ours(N, compile=True)}
    if hf is not None:
        hf_generate(hf, prompts, 2, device)  # warm-up
        fns["hf"] = lambda: hf_generate(hf, prompts, N, device)
    t, out = compare(fns, device, reps, warmup=1)
    same_compiled = out["compiled"] == out["eager"]
    report(f"{name} compiled vs eager @{N}", B * N / t["compiled"], B * N / t["eager"], "tok/s",
           target=3.0 if device.type == "cuda" and name == "qwen2-0.5b" else None,
           ratio=t.ratio("eager", "compiled")[0], spread=t.ratio("eager", "compiled")[1],
           note=f"{note}tokens equal: {same_compiled}")
    report(f"{name} compile time", t_compile, None, "s",
           note=f"the first decode step of a new bucket (batch {B}, cache "
                f"{min(bucket(max(map(len, prompts)) + N), cfg.block_size)}); the whole first "
                f"call {t_first:.1f}s; later calls reuse the graph")
    if hf is None:
        print("  (transformers not installed: no Hugging Face baseline)")
    else:
        a, b = out["eager"], out["hf"]
        same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (B * N)
        rows = sum(ra == rb for ra, rb in zip(a, b))
        for kind in ("eager", "compiled"):
            r, spread = t.ratio("hf", kind)
            report(f"{name} {kind} vs HF generate @{N}", B * N / t[kind], B * N / t["hf"], "tok/s",
                   target=target, ratio=r, spread=spread,
                   note=f"{note}tokens equal to HF's: {same:.3f}, rows identical {rows}/{B}; "
                        f"HF {hf.config._attn_implementation} attention, dynamic cache")
            RESULTS[f"{name} {kind} vs HF generate @{N}"]["token_match"] = same
        del hf

    # the decode step (and its argmax) against its own matmuls, per step, rounds interleaved;
    # the steps of a whole response, as their cost grows with the slots attended over
    K = N - 1
    steps = {kind: decode_loop(model, prompts, N, K, device, args, compiled=kind == "compiled")
             for kind in ("eager", "compiled")}
    floor = matmul_floor(model, B, device, args)
    loops = {**steps, **{k: (lambda f=f: [f() for _ in range(K)]) for k, f in floor.items()}}
    t, _ = compare(loops, device, reps, warmup=0)  # (all warm: generate ran them)
    best = [min(a, b) for a, b in zip(*(t.rounds(k) for k in floor))]  # the floor, round by round
    for kind in ("eager", "compiled"):
        r = sorted(a / b for a, b in zip(t.rounds(kind), best))
        report(f"{name} decode step / matmuls ({kind})", 1e3 * t[kind] / K,
               1e3 * sorted(best)[len(best) // 2] / K, "ms", better="lower",
               target=1.2 if name == "gpt2-w4" else None, ratio=r[len(r) // 2], spread=(r[0], r[-1]),
               note=f"{note}mean of {K} steps at batch {B}; matmuls: every linear layer and the "
                    f"LM head on a ({B}, C) input, the faster orientation of each round")

    if name in ("d256", "gpt2", "small"):
        bench_naive(name, model, prompts, N, out["eager"], device, args)


def bench_naive(name, model, prompts, N, ours_out, device, args):
    """Ours against the sampler that recomputes the whole sequence for every new token: run in
    full, interleaved, for a small model; for gpt2 estimated from three of its steps."""
    B = len(prompts)

    def ours():
        with autocast(args, device):
            return generate(model, prompts, N, temperature=0)[0]

    def naive():
        with autocast(args, device):
            return naive_generate(model, prompts, N, device)

    if name == "gpt2":
        t_ours = compare({"ours": ours}, device, 3, warmup=0)[0]["ours"]
        est, steps = naive_estimate(model, prompts, N, device, args)
        report(f"{name} vs naive @{N}", B * N / t_ours, B * N / est, "tok/s", target=5.0,
               note="estimated, no spread: its step timed at lengths " +
                    ", ".join(f"{s} ({v:.2f}s)" for s, v in steps.items()) +
                    f", the quadratic through them summed over {N} steps")
    else:
        t, out = compare({"ours": ours, "naive": naive}, device, 3, warmup=0)
        r, spread = t.ratio("naive", "ours")
        report(f"{name} vs naive @{N}", B * N / t["ours"], B * N / t["naive"], "tok/s", ratio=r,
               spread=spread, note=f"tokens equal to ours: {out['naive'] == ours_out}")
