"""
bench_sampling.py -- bench.py's sampling section: tokens/s of sample.generate against a
sampler that recomputes everything and against Hugging Face's generate on the same weights.

The batch is ragged (32 prompts of 8-40 tokens, left-padded), decoding greedy with no EOS,
so every sampler produces the same number of tokens and, where the weights agree, the same
tokens: the benchmark checks that they do before it trusts a timing.
"""

import torch
import torch.nn.functional as F

from measure import RESULTS, autocast, compare, header, random_model, report, timed
from model import GPTConfig, positions_from_mask, preset
from sample import generate

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

        def ours(n, model=model):
            with autocast(args, device):
                return generate(model, prompts, n, temperature=0)[0]

        # warm-up, and a first check that the baselines decode what we decode
        hf = hf_twin(model, device)
        def naive(n, model=model):
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


def bench_sampling_qwen2(args, device):
    """The sampler against Hugging Face's generate on a Qwen2-0.5B-shaped model: grouped-query
    attention, rotary positions and a 151936-word LM head. Full depth (24 layers) on a GPU; on a
    CPU 4 layers unless --qwen2-layers says otherwise (the LM head, a third of the weights at
    full depth, weighs more here)."""
    if args.quick:  # the same code path at toy sizes
        cfg, B, N = qwen2_config(2, vocab_size=1000, n_embd=128, n_head=4, n_kv_head=2, head_dim=32,
                                 n_inner=256, block_size=256), 8, 16
    else:
        cfg, B, N = qwen2_config(args.qwen2_layers or (24 if device.type == "cuda" else 4)), 32, 128
    model = random_model(cfg, device)
    hf = hf_twin(model, device)
    depth = f"{cfg.n_layer} of Qwen2-0.5B's 24 layers" if cfg.n_layer != 24 else "full depth"
    name = "qwen2 (toy)" if args.quick else "qwen2-0.5b"
    prompts = make_prompts(cfg.vocab_size, n=B)
    header(f"sampling: {name} shape ({model.num_params() / 1e6:.1f}M params, {depth}), batch {B}, "
           f"prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens, greedy, no EOS")
    if hf is None:
        print("  (transformers not installed: no Hugging Face baseline)")
        return

    def ours():
        with autocast(args, device):
            return generate(model, prompts, N, temperature=0)[0]

    def theirs():
        with autocast(args, device):
            return hf_generate(hf, prompts, N, device)

    ours_short = generate(model, prompts, 2, temperature=0)[0]  # warm-up, at 2 tokens
    hf_short = hf_generate(hf, prompts, 2, device)
    t, out = compare({"ours": ours, "hf": theirs}, device, repeats=3, warmup=0)
    a, b = out["ours"], out["hf"]
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (B * N)
    rows = sum(ra == rb for ra, rb in zip(a, b))
    report(f"{name} vs HF generate @{N}", B * N / t["ours"], B * N / t["hf"], "tok/s", target=1.2,
           note=f"{depth}; tokens equal to HF's: {same:.3f}, rows identical {rows}/{B} (first 2 "
                f"tokens: {ours_short == hf_short}); HF {hf.config._attn_implementation} "
                f"attention; medians of 3 interleaved runs")
    RESULTS[f"{name} vs HF generate @{N}"]["token_match"] = same

