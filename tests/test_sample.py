import pytest
import torch

from conftest import PROMPTS, greedy_reference
from model import GPT, preset
from sampler import filter_logits, generate, next_token

EOS = 60


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=61)).eval()


def test_greedy_ragged_batch_equals_each_prompt_alone():
    m = tiny()
    resp, fin = generate(m, PROMPTS, 12, temperature=0)
    for p, r in zip(PROMPTS, resp):
        assert r == greedy_reference(m, p, 12)
        alone, _ = generate(m, [p], 12, temperature=0)
        assert alone[0] == r
    assert fin == [False] * 4  # no eos_id given: nothing finishes


def test_batch_order_and_companions_do_not_matter():
    m = tiny()
    a, _ = generate(m, PROMPTS, 10, temperature=0)
    b, _ = generate(m, PROMPTS[::-1], 10, temperature=0)
    assert a == b[::-1]


def test_eos_stops_row_and_max_new_tokens_respected():
    m = tiny(seed=3)
    free, _ = generate(m, PROMPTS, 15, temperature=0)
    # make a token that row 0 generates the EOS: that row must stop at its first occurrence
    eos = free[0][2]
    resp, fin = generate(m, PROMPTS, 15, temperature=0, eos_id=eos)
    assert fin[0] and len(resp[0]) <= 3
    for r, f, full in zip(resp, fin, free):
        if eos in full:
            k = full.index(eos)
            assert r == full[:k + 1] and f
        else:
            assert r == full and not f and len(r) == 15
    assert all(len(r) <= 15 for r in resp)


def test_stops_early_when_all_rows_done():
    m = tiny()
    calls = {"n": 0}
    orig = m.forward

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)
    m.forward = counting
    first, _ = generate(m, [[1, 2, 3]], 1, temperature=0)
    calls["n"] = 0
    resp, fin = generate(m, [[1, 2, 3]], 50, temperature=0, eos_id=first[0][0], stop_check_every=1)
    assert resp == [first[0]] and fin == [True]
    assert calls["n"] == 1  # the prefill alone: the first token was EOS, no decode step


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_finished_rows_leave_the_batch_and_nobody_else_changes(temperature, monkeypatch):
    """Rows that emitted EOS are dropped from the batch (a quarter of it done, checked every
    few steps): each other row gets exactly the tokens, and with a seed exactly the samples,
    that it gets when nobody is dropped (no check before the end)."""
    import sampler
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=12, block_size=64)).double().eval()  # 12 tokens: EOS comes early and often
    prompts = [[1 + i % 11, 2, 3][:1 + i % 3] for i in range(16)]
    sizes = []
    step = sampler.decode_step
    monkeypatch.setattr(sampler, "decode_step",
                        lambda model, tokens, *a: sizes.append(len(tokens)) or step(model, tokens, *a))
    free, _ = sampler.generate(m, prompts, 40, temperature=temperature, seed=3)
    rows_with = lambda t: sum(t in r for r in free)  # noqa: E731
    eos = max((t for t in range(12) if rows_with(t) < len(prompts)), key=rows_with)  # ends some rows, not all
    kw = dict(temperature=temperature, eos_id=eos, seed=3, pad_id=0)
    sizes.clear()
    dropped, fin = sampler.generate(m, prompts, 40, **kw)
    assert min(sizes) < len(prompts)  # rows did leave the batch
    sizes.clear()
    kept, fin2 = sampler.generate(m, prompts, 40, stop_check_every=1000, **kw)
    assert set(sizes) == {len(prompts)}
    assert dropped == kept and fin == fin2 and 0 < sum(fin) < len(prompts)


def test_prompt_too_long_and_context_cap():
    m = tiny()  # block_size 64
    with pytest.raises(ValueError, match="leaves no room"):
        generate(m, [[1] * 64], 5, temperature=0)
    resp, fin = generate(m, [[1] * 60], 50, temperature=0)
    assert len(resp[0]) == 4 and fin == [False]


def test_top_k_and_top_p_support():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda x: torch.isfinite(x)[0].tolist()
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # mass ahead of each token: 0, .5, .7, .85, .95. A token is dropped once the mass ahead of
    # it reaches top_p. The thresholds below stay clear of those sums: 0.5 + 0.2 is not 0.7
    # exactly in float32, so top_p = 0.7 itself would test rounding, not the rule.
    assert keep(filter_logits(logits, top_p=0.69)) == [True, True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.71)) == [True, True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.5001)) == [True, True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.4999)) == [True, False, False, False, False]
    assert keep(filter_logits(logits, top_p=0.1)) == [True, False, False, False, False]
    assert keep(filter_logits(logits, top_k=4, top_p=0.9)) == [True, True, True, True, False]
    assert keep(filter_logits(logits, top_k=2, top_p=0.9)) == [True, True, False, False, False]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # order must not matter
    assert keep(filter_logits(shuffled, top_p=0.69)) == [False, True, False, False, True]


def test_sampling_respects_top_k():
    m = tiny()
    with torch.no_grad():
        first = m(torch.tensor([[1, 2, 3]]))[0, -1]
    allowed = set(torch.topk(first, 3).indices.tolist())
    resp, _ = generate(m, [[1, 2, 3]] * 64, 1, temperature=1.0, top_k=3, seed=0)
    assert {r[0] for r in resp} <= allowed


def test_sampling_draws_the_softmax_distribution():
    """next_token at temperature T draws from softmax(logits / T): frequencies within 5
    standard errors over 40,000 draws, never a token top-k removed, and even a tail of tokens
    of probability 3e-8 each is reached (fp32 running sums would lose it: 1 + 3e-8 == 1)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for T, k in ((1.0, None), (0.7, None), (1.0, 4)):
        p = filter_logits(logits[None] / T, top_k=k).softmax(-1)[0]
        draws = next_token(logits.expand(40000, -1), T, k, None, torch.rand(40000, 1, generator=g))
        freq = torch.bincount(draws, minlength=6).double() / 40000
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / 40000).sqrt() + 1e-12).all(), (T, k, freq, p)
        if k:
            assert freq[k:].sum() == 0
    V = 20000  # token 0 holds nearly all the mass; each of the others exp(-17.3) ~ 3e-8 of it
    tail = torch.full((V,), -17.3)
    tail[0] = 0.0
    hits = sum(int((next_token(tail.expand(2000, -1), 1.0, None, None, torch.rand(2000, 1, generator=g)) > 0).sum())
               for _ in range(10))
    expected = 20000 * (V - 1) * torch.exp(torch.tensor(-17.3, dtype=torch.float64)).item()  # ~ 12.4
    assert 0.3 * expected < hits < 2.5 * expected, (hits, expected)


@pytest.mark.parametrize("kw,msg", [({"temperature": -1.0}, "temperature must be 0 (greedy) or positive"),
                                    ({"top_k": 0}, "top_k must be at least 1"),
                                    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
                                    ({"top_p": 1.5}, "top_p must be in (0, 1]")])
def test_settings_that_would_sample_nonsense_are_errors(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        generate(tiny(), PROMPTS, 5, **kw)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate(tiny(), PROMPTS, 0)


def test_seed_reproducible_and_different_seeds_differ():
    m = tiny()
    state = torch.random.get_rng_state()
    a, _ = generate(m, PROMPTS, 10, temperature=1.0, seed=1)
    b, _ = generate(m, PROMPTS, 10, temperature=1.0, seed=1)
    c, _ = generate(m, PROMPTS, 10, temperature=1.0, seed=2)
    assert a == b and a != c
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_command_line(tmp_path):
    import os
    import subprocess
    import sys
    from dataclasses import asdict

    from checkpoint import atomic_save
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    m = GPT(preset("tiny", vocab_size=258))
    ckpt = tmp_path / "m.pt"
    atomic_save({"model": m.state_dict(), "model_config": asdict(m.config), "prompt_template": "sort: {prompt}\n",
                 "tokenizer": {"name": "bytes", "source": None}}, str(ckpt))
    run = lambda *a: subprocess.run([sys.executable, os.path.join(root, "sample.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=root)
    ok = run("--ckpt", str(ckpt), "--prompt", "dcba", "--num-samples", "3", "--max-new-tokens", "5", "--seed", "1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(f"[{ckpt}, sample ") == 3 and ok.stdout.endswith("\n")  # each answer labelled, plain
    assert ok.stderr.count("[no EOS: cut at --max-new-tokens 5]") <= 3
    for args, msg in [(("--ckpt", str(tmp_path / "none.pt")), "does not exist"),
                      (("--ckpt", str(tmp_path)), f"checkpoint {tmp_path} is a directory; give one of its checkpoint "
                                                  "files (m.pt)"),
                      (("--ckpt", str(ckpt), "--prompt", "x" * 80), "--prompt: the prompt's 87 tokens leave no room")]:
        bad = run(*args, *(() if "--prompt" in args else ("--prompt", "x")))
        assert bad.returncode != 0 and msg in bad.stderr and "Traceback" not in bad.stderr

    # the tokenizer the checkpoint names must be the one this machine gives, or nothing runs
    for saved, msg in [({"name": "gpt2", "source": None}, "trained with tokenizer 'gpt2'"),
                       ({"name": "qwen", "source": str(tmp_path / "gone")}, "which is not there")]:
        other = tmp_path / "other.pt"
        atomic_save({"model": m.state_dict(), "model_config": asdict(m.config), "tokenizer": saved}, str(other))
        bad = run("--ckpt", str(other), "--prompt", "x")
        assert bad.returncode != 0 and msg in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.parametrize("kw", [{}, dict(model_type="qwen2", n_head=8, n_kv_head=4, qkv_bias=True)],
                         ids=["gpt2", "qwen2-like"])
def test_wide_model_decode_equals_recompute(kw):
    """At width 512 the decode step computes its linears and LM head as (W @ x^T)^T (model.linear:
    weights of half a million or more), on transposed views: the tokens must still be the
    recompute-everything ones."""
    import model as model_py
    torch.manual_seed(0)
    m = GPT(preset("tiny", n_layer=1, n_embd=512, vocab_size=1100, **kw)).eval()
    assert m.transformer.h[0].attn.c_attn.weight.numel() >= 1 << 19  # the oriented path runs
    calls = []
    orig = model_py.linear
    model_py.linear = lambda layer, x, decode=False: calls.append(decode) or orig(layer, x, decode)
    try:
        resp, _ = generate(m, PROMPTS, 8, temperature=0)
    finally:
        model_py.linear = orig
    assert any(calls)
    for p, r in zip(PROMPTS, resp):
        assert r == greedy_reference(m, p, 8)


def test_k_answers_share_one_prefill_and_are_those_of_k_calls(monkeypatch):
    """samples=k: each prompt runs through the model once (one prefill of B rows), its keys and
    values copied to its k rows; with one seed per answer, answer j is, token for token, what a
    call with that seed alone samples (fp32; rows that stop early leave the batch on the way)."""
    import sampler
    m = tiny(seed=3)
    seeds = [5, 6, 7]
    widths = []
    orig = m.forward
    monkeypatch.setattr(m, "forward", lambda idx, *a, **k: widths.append(tuple(idx.shape)) or orig(idx, *a, **k))
    for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=20, eos_id=EOS), dict(temperature=0.0)):
        widths.clear()
        shared, fin = sampler.generate(m, PROMPTS, 12, seed=seeds, samples=3, **kw)
        assert widths[0] == (len(PROMPTS), 7) and all(w[1] == 1 for w in widths[1:])  # one prefill, then decode steps
        assert widths[1][0] == 3 * len(PROMPTS)
        alone = [sampler.generate(m, PROMPTS, 12, seed=s, **kw) for s in seeds]
        assert shared == [r for i in range(len(PROMPTS)) for r in (a[0][i] for a in alone)]
        assert fin == [f for i in range(len(PROMPTS)) for f in (a[1][i] for a in alone)]
    assert len({tuple(r) for r in shared[:3]}) == 1  # greedy: the k answers of a prompt agree
    # one temperature per answer: a prompt's greedy answer and its samples in one batch
    temps = [0.0, 1.0, 0.7]
    mixed = sampler.generate(m, PROMPTS, 12, seed=seeds, samples=3, temperature=temps, eos_id=EOS)
    alone = [sampler.generate(m, PROMPTS, 12, seed=s, temperature=t, eos_id=EOS) for s, t in zip(seeds, temps)]
    assert mixed == tuple([r for i in range(len(PROMPTS)) for r in (a[k][i] for a in alone)] for k in (0, 1))
    one_generator = sampler.generate(m, [PROMPTS[1]], 12, seed=4, samples=3)[0]
    assert one_generator == sampler.generate(m, [PROMPTS[1]] * 3, 12, seed=4)[0]  # one seed: row order
    for bad in (dict(seed=[1, 2]), dict(temperature=[0.0, 1.0])):
        with pytest.raises(ValueError, match="one per sample"):
            sampler.generate(m, PROMPTS, 4, samples=3, **bad)
    with pytest.raises(ValueError, match="temperature must be 0"):
        sampler.generate(m, PROMPTS, 4, samples=2, temperature=[0.0, -1.0])


def test_greedy_picks_the_first_of_equal_maxima_as_argmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0], [-1.0, float("nan"), 5.0, 5.0]])
    for x in (logits, logits.bfloat16(), logits.t().contiguous().t()):
        assert next_token(x, 0.0, None, None).tolist() == x.argmax(-1).tolist() == [1, 0, 1]


def test_another_dtype_samples_with_a_copy_cast_once():
    """dtype=bf16 on fp32 weights: the sampler runs a copy whose weights (and so its KV cache and
    logits) are bf16, made once per call; the model itself is left as it was, in its mode. On a
    CPU the bf16 decode step reads every slot of the cache (unwritten ones masked): cheaper there
    than a view of the written ones, which the bf16 matmul would copy."""
    import sampler
    m = tiny(seed=1).train()
    cast = GPT(m.config)
    cast.load_state_dict(m.state_dict())
    cast = cast.to(torch.bfloat16).eval()
    seen = []
    orig = sampler.decode_step
    sampler.decode_step = lambda model, tokens, cache, n_slots: seen.append((cache.k[0].dtype, n_slots)) or \
        orig(model, tokens, cache, n_slots)
    try:
        got = generate(m, PROMPTS, 10, temperature=0, dtype=torch.bfloat16)
    finally:
        sampler.decode_step = orig
    assert got == generate(cast, PROMPTS, 10, temperature=0)
    assert set(seen) == {(torch.bfloat16, None)} and m.training  # None: bf16 on a CPU reads the whole cache
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert sampler.in_dtype(m, None) is m and sampler.in_dtype(m, torch.float32) is m
    twin = sampler.in_dtype(m, torch.bfloat16)
    assert twin.lm_head.weight is twin.transformer.wte.weight  # still one tied matrix
    kept = sampler.in_dtype(m, torch.bfloat16, keep=True)  # compiled sampling keeps its copy...
    with torch.no_grad():
        m.transformer.wte.weight.mul_(2)
    assert sampler.in_dtype(m, torch.bfloat16, keep=True) is kept  # ...and refreshes it in place
    assert torch.equal(kept.lm_head.weight, m.transformer.wte.weight.bfloat16())
