"""model.py's Llama-family switches on their own (no transformers needed): grouped-query
attention and its KV cache, the sampler on it, rotary positions under padding, the
trunk/head split, parameter and FLOP counts. test_hf.py checks the numbers against
transformers."""

import math

import pytest
import torch

from conftest import PROMPTS, greedy_reference
from model import GPT, preset, rope_frequencies
from sampler import generate

V = 61


def llama(seed=0, **kw):
    """A tiny Llama-family model: 4 query heads sharing 2 K/V heads, SwiGLU, RMSNorm, rotary."""
    torch.manual_seed(seed)
    cfg = dict(model_type="llama", n_head=4, n_kv_head=2, n_inner=96, vocab_size=V, tie_embeddings=False)
    return GPT(preset("tiny", **{**cfg, **kw})).eval()


def test_kv_cache_holds_kv_heads_only():
    # (that it matches a full recompute is test_model.py's test, run on this model too)
    cache = llama().new_cache(3, 14)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 14, 16)  # per layer: B, n_kv_head (not n_head), slots, head_dim


@pytest.mark.parametrize("kw", [dict(), dict(model_type="qwen3", qk_norm=True, head_dim=48, n_kv_head=1),
                                dict(model_type="qwen2", qkv_bias=True, tie_embeddings=True)])
def test_generate_on_gqa_model_equals_recompute(kw):
    m = llama(**kw)
    resp, fin = generate(m, PROMPTS, 10, temperature=0)
    for p, r in zip(PROMPTS, resp):
        assert r == greedy_reference(m, p, 10)
    assert fin == [False] * 4
    b, _ = generate(m, PROMPTS[::-1], 10, temperature=0)
    assert b == resp[::-1]


def test_generate_stops_on_any_of_several_eos_ids():
    m = llama(seed=3)
    free, _ = generate(m, PROMPTS, 12, temperature=0)
    eos = {free[0][2], free[1][4]}  # two different stop tokens (an end-of-turn and an end-of-text)
    assert len(eos) == 2
    resp, fin = generate(m, PROMPTS, 12, temperature=0, eos_id=eos)
    for r, f, full in zip(resp, fin, free):
        stops = [i for i, t in enumerate(full) if t in eos]
        assert r == (full[:stops[0] + 1] if stops else full) and f == bool(stops)
    assert fin[0] and fin[1]
    one, _ = generate(m, PROMPTS, 12, temperature=0, eos_id=free[0][2])  # a single id still works
    assert one[0] == free[0][:3]


def test_hidden_then_head_is_forward():
    m = llama()
    idx = torch.randint(0, V, (2, 7))
    sel = torch.zeros(2, 7, dtype=torch.bool)
    sel[0, 2] = sel[1, 5] = sel[1, 6] = True
    x = m.hidden(idx)
    assert x.shape == (2, 7, 64)
    torch.testing.assert_close(m.head(x), m(idx))
    torch.testing.assert_close(m.head(x, sel), m(idx, output_mask=sel))
    assert m.head(x, sel).shape == (3, V)


def test_param_and_flop_counts_for_gqa_and_swiglu():
    m = llama()
    C, L, hd, nh, nkv, I = 64, 2, 16, 4, 2, 96
    per_layer = C * (nh + 2 * nkv) * hd + nh * hd * C + 3 * C * I + 2 * C  # attn, SwiGLU, 2 RMSNorms
    non_emb = L * per_layer + C  # + final norm
    assert m.num_params(non_embedding=True) == non_emb
    assert m.num_params() == non_emb + 2 * V * C  # untied: embedding and head
    assert llama(tie_embeddings=True).num_params() == non_emb + V * C
    T = 64
    assert m.flops_per_token(T, training=False) == 2 * (non_emb + V * C) + 4 * L * T * nh * hd
    assert "wpe" not in m.transformer  # no learned positions


def test_llama3_rope_scaling_keeps_high_and_stretches_low_frequencies():
    cfg = preset("tiny", model_type="llama", n_head=4, rope_theta=10000.0)  # head_dim 16
    plain = rope_frequencies(cfg)
    cfg.rope_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=64)
    scaled = rope_frequencies(cfg)
    waves = 64 * plain / (2 * math.pi)  # waves per original context
    high, low = waves > 4.0, waves < 1.0
    assert high.any() and low.any() and (~high & ~low).any()  # all three bands present
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    mid = ~high & ~low
    assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


def test_wide_heads_count_in_attention_flops():
    m = llama(model_type="qwen3", qk_norm=True, head_dim=48)  # n_head * head_dim = 192 != n_embd
    assert m.flops_per_token(10, training=False) - m.flops_per_token(0, training=False) == 4 * 2 * 10 * 4 * 48


def test_checkpoint_round_trip(tmp_path):
    from dataclasses import asdict

    from checkpoint import atomic_save, load_checkpoint, model_from_checkpoint
    for tied in (False, True):
        m = llama(tie_embeddings=tied, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                         original_max_position_embeddings=16),
                  hf_config={"model_type": "llama", "eos_token_id": [1, 2], "rope_scaling": None})
        path = str(tmp_path / f"m{tied}.pt")
        atomic_save({"model": m.state_dict(), "model_config": asdict(m.config)}, path)
        m2 = model_from_checkpoint(load_checkpoint(path)).eval()
        assert m2.config == m.config and (m2.lm_head.weight is m2.transformer.wte.weight) == tied
        x = torch.randint(0, V, (2, 5))
        torch.testing.assert_close(m(x), m2(x))
