import pytest
import torch

from checkpoint import atomic_save, load_checkpoint, model_from_checkpoint
from hf import load_pretrained
from model import GPT, PRESETS, positions_from_mask, preset
from conftest import extra


def tiny(vocab=61, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=vocab, **kw)).eval()


def test_presets_and_unknown_name():
    assert GPT(preset("tiny", vocab_size=258)).num_params() < 1_000_000
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny, small, gpt2"):
        preset("huge")
    cfg = preset("gpt2")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (12, 12, 768, 50257)
    assert set(PRESETS) >= {"tiny", "small", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


def test_gpt2_param_count_and_flops():
    with torch.device("meta"):
        m = GPT(preset("gpt2"))
    assert m.num_params() == 124_439_808  # GPT-2 small, tied head counted once
    f = m.flops_per_token(1024)
    assert 6 * 124e6 < f < 6 * 200e6


def test_hf_names():
    names = set(tiny().state_dict())
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
              "transformer.ln_f.bias", "lm_head.weight"]:
        assert n in names


@pytest.mark.parametrize("kw", [{}, dict(model_type="llama", n_head=4, n_kv_head=2, n_inner=96, tie_embeddings=False)],
                         ids=["gpt2", "llama-gqa"])
def test_left_and_right_padding_give_same_logits(kw):
    m = tiny(**kw)
    rows = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
    T = 5
    full = [m(torch.tensor([r]))[0] for r in rows]
    for side in ("left", "right"):
        idx = torch.zeros(3, T, dtype=torch.long)
        am = torch.zeros(3, T, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            idx[i, sl] = torch.tensor(r)
            am[i, sl] = 1
        out = m(idx, position_ids=positions_from_mask(am), attention_mask=am)
        assert torch.isfinite(out).all()  # padding rows must not produce NaN
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(out[i, sl], full[i], atol=1e-5, rtol=0)


def test_output_mask_selects_positions():
    m = tiny()
    idx = torch.randint(0, 61, (2, 7))
    sel = torch.zeros(2, 7, dtype=torch.bool)
    sel[0, 2] = sel[1, 5] = sel[1, 6] = True
    full = m(idx)
    part = m(idx, output_mask=sel)
    assert part.shape == (3, 61)
    torch.testing.assert_close(part, full[sel])


@pytest.mark.parametrize("kw", [{}, dict(model_type="llama", n_head=4, n_kv_head=2, n_inner=96, tie_embeddings=False)],
                         ids=["gpt2", "llama-gqa"])
def test_kv_cache_matches_full_recompute_ragged(kw):
    m = tiny(**kw)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    P, steps, B = 6, 8, 3
    idx = torch.zeros(B, P, dtype=torch.long)
    am = torch.zeros(B, P + steps, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p)
        am[i, P - len(p):P] = 1
    am[:, P:] = 1
    cache = m.new_cache(B, P + steps)
    logits = m(idx, positions_from_mask(am[:, :P]), am[:, :P], cache=cache)[:, -1]
    seqs = [list(p) for p in prompts]
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        for i in range(B):  # the reference: each row alone, whole sequence recomputed
            ref = m(torch.tensor([seqs[i]]))[0, -1]
            torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=0)
        tok = torch.randint(0, 61, (B,), generator=g)
        for i in range(B):
            seqs[i].append(int(tok[i]))
        pos = torch.tensor([len(s) - 1 for s in seqs])
        logits = m(tok[:, None], pos[:, None], am[:, :P + t + 1], cache=cache, cache_pos=P + t)[:, -1]


def test_cache_without_mask_uses_correct_causal_alignment():
    m = tiny()
    seq = torch.randint(0, 61, (2, 9))
    cache = m.new_cache(2, 9)
    m(seq[:, :5], cache=cache)
    out = m(seq[:, 5:], cache=cache, cache_pos=5)  # 4 queries against 9 keys
    torch.testing.assert_close(out, m(seq)[:, 5:], atol=1e-5, rtol=0)


def test_too_long_sequence_is_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_checkpoint_roundtrip_and_errors(tmp_path):
    from dataclasses import asdict
    m = tiny()
    path = tmp_path / "m.pt"
    atomic_save({"model": m.state_dict(), "model_config": asdict(m.config)}, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    (tmp_path / "plain").write_bytes(b"")  # the permissions open() gives under this umask, not mkstemp's 0600
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    (tmp_path / "plain").unlink()
    m2 = model_from_checkpoint(load_checkpoint(str(path))).eval()
    x = torch.randint(0, 61, (2, 5))
    torch.testing.assert_close(m(x), m2(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(str(bad))
    ck = load_checkpoint(str(path))
    ck["model_config"]["n_embd"] = 32
    with pytest.raises(ValueError, match="does not match"):
        model_from_checkpoint(ck)


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(str(tmp_path))


def test_matches_huggingface_gpt2():
    transformers = extra("transformers", "interop test")
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d).eval()
    x = torch.randint(0, 61, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
