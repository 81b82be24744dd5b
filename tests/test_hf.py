"""hf.py against Hugging Face transformers: every supported family, built from a tiny config
with random weights (the same files and parameter names as the real checkpoints), loaded by
selm and compared logit for logit, token for token; exported back and reloaded by
transformers; and the loader's errors, each one line."""

import json
import os

import pytest
import torch

import hf
from model import GPT, positions_from_mask, preset
from sampler import generate
from conftest import extra

transformers = extra("transformers", "these tests compare against transformers")
extra("safetensors", "transformers saves model.safetensors")

V = 300
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)  # head_dim 16: all three frequency bands
CASES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_positions=128, n_embd=64, n_layer=2, n_head=4),
    "llama-gqa": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2),
    "llama3-rope": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=1, rope_theta=500000.0,
                                                    rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=None),
    "qwen2-bias-tied": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3-qknorm-headdim": lambda: transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32),
}


def hf_model(name, seed=0):
    """A transformers model of CASES[name]; every parameter moved off its init (norm weights
    of exactly 1 and biases of exactly 0 would hide a mis-mapped tensor)."""
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(CASES[name]()).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def saved(model, path):
    model.save_pretrained(path)
    return str(path)


def ragged_batch(seed=1, B=3, T=11):
    """Left-padded token ids, attention mask and position ids counted from the mask."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :4] = 0
    am[2, :9] = 0
    return idx, am, positions_from_mask(am)


def hf_logits(m, idx, am, pos):
    with torch.no_grad():
        return m(idx, attention_mask=am, position_ids=pos).logits


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_on_left_padded_batch(name, tmp_path):
    ref = hf_model(name)
    ours = hf.load_pretrained(saved(ref, tmp_path)).eval()
    assert ours.config.model_type == ref.config.model_type
    idx, am, pos = ragged_batch()
    with torch.no_grad():
        got = ours(idx, pos, am)
    real = am.bool()
    torch.testing.assert_close(got[real], hf_logits(ref, idx, am, pos)[real], atol=1e-4, rtol=0)


def test_each_switch_is_exercised(tmp_path):
    """The cases above really differ where they claim to."""
    cfgs = {n: hf.load_pretrained(saved(hf_model(n), tmp_path / n)).config for n in CASES}
    assert cfgs["llama-gqa"].n_kv_head == 2 and not cfgs["llama-gqa"].tie_embeddings
    assert cfgs["llama3-rope"].rope_scaling["factor"] == 8.0 and cfgs["llama3-rope"].tie_embeddings
    assert cfgs["qwen2-bias-tied"].qkv_bias and cfgs["qwen2-bias-tied"].tie_embeddings
    assert cfgs["qwen3-qknorm-headdim"].qk_norm and cfgs["qwen3-qknorm-headdim"].head_dim == 32
    assert not cfgs["gpt2"].llama and all(cfgs[n].llama for n in CASES if n != "gpt2")


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_matches_transformers(name, tmp_path):
    ref = hf_model(name)
    ours = hf.load_pretrained(saved(ref, tmp_path)).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    n = 8
    responses, _ = generate(ours, prompts, n, temperature=0)
    P = max(map(len, prompts))
    idx = torch.zeros(len(prompts), P, dtype=torch.long)
    am = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):], am[i, P - len(p):] = torch.tensor(p), 1
    out = ref.generate(idx, attention_mask=am, max_new_tokens=n, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    assert responses == out[:, P:].tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_export_round_trip_through_transformers(name, tmp_path):
    ref = hf_model(name)
    ours = hf.load_pretrained(saved(ref, tmp_path / "src"))
    hf.save_pretrained(ours, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(back) is type(ref)
    src_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: v for k, v in out_cfg.items() if k not in ("dtype", "torch_dtype")} == \
           {k: v for k, v in src_cfg.items() if k not in ("dtype", "torch_dtype")}
    idx, am, pos = ragged_batch()
    real = am.bool()
    torch.testing.assert_close(hf_logits(back, idx, am, pos)[real], hf_logits(ref, idx, am, pos)[real],
                               atol=1e-4, rtol=0)
    # and selm reads its own export back
    again = hf.load_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx, pos, am), ours.eval()(idx, pos, am))


@pytest.mark.parametrize("kw", [dict(), dict(model_type="llama", n_kv_head=1),
                                dict(model_type="qwen2", n_kv_head=1, qkv_bias=True, tie_embeddings=False),
                                dict(model_type="qwen3", head_dim=48, qk_norm=True,
                                     rope_scaling=dict(LLAMA3_ROPE))],
                         ids=["gpt2", "llama", "qwen2", "qwen3"])
def test_export_of_a_model_trained_from_scratch(kw, tmp_path):
    """No source config.json: export writes one from our fields."""
    torch.manual_seed(0)
    ours = GPT(preset("tiny", vocab_size=V, **kw)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(ours, str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    idx, am, pos = ragged_batch()
    real = am.bool()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(back, idx, am, pos)[real], ours(idx, pos, am)[real],
                                   atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="cannot express"):
        hf.save_pretrained(GPT(preset("tiny", vocab_size=V, model_type="llama", qkv_bias=True)), str(tmp_path))


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    ref = hf_model("qwen2-bias-tied")
    idx, am, pos = ragged_batch()
    want = hf_logits(ref, idx, am, pos)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes((tmp_path / "sharded" / "config.json").read_bytes())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for d in ("sharded", "bin"):
        with torch.no_grad():
            got = hf.load_pretrained(str(tmp_path / d)).eval()(idx, pos, am)
        torch.testing.assert_close(got[am.bool()], want[am.bool()], atol=1e-4, rtol=0)


def test_export_copies_tokenizer_files_and_weights_atomically(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')
    (tok / "unrelated.txt").write_text("x")
    ours = hf.load_pretrained(saved(hf_model("llama-gqa"), tmp_path / "src"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pytorch_model.bin").write_text("stale")  # an earlier export's: removed
    hf.save_pretrained(ours, str(tmp_path / "out"), tokenizer_dir=str(tok))
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json"]
    (tmp_path / "plain").write_bytes(b"")  # every file readable as this umask says, the weights too
    modes = {(tmp_path / "out" / f).stat().st_mode & 0o777 for f in os.listdir(tmp_path / "out")}
    assert modes == {(tmp_path / "plain").stat().st_mode & 0o777}
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        hf.save_pretrained(ours, str(tmp_path / "out2"), tokenizer_dir=str(tmp_path / "src"))


# ---- errors: one line each ----------------------------------------------------------------

def one_line_error(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_loader_errors(tmp_path, monkeypatch):
    d = tmp_path / "m"
    saved(hf_model("mistral"), d)
    path = str(d)
    good = (d / "config.json").read_text()

    edit_config(d, model_type="gemma")
    one_line_error(ValueError, "model_type 'gemma' is not supported; supported: gpt2, llama",
                   hf.load_pretrained, path)
    (d / "config.json").write_text(good)
    edit_config(d, sliding_window=16)
    one_line_error(ValueError, "sliding-window attention over 16 tokens, narrower than the context of 128",
                   hf.load_pretrained, path)
    assert hf.load_pretrained(path, block_size=16).config.block_size == 16  # a window that covers it
    (d / "config.json").write_text(good)
    edit_config(d, model_type="qwen2", use_sliding_window=True, sliding_window=32)
    one_line_error(ValueError, "sliding-window", hf.load_pretrained, path)
    (d / "config.json").write_text(good)
    edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    one_line_error(ValueError, "rope scaling type 'yarn' is not supported", hf.load_pretrained, path)
    (d / "config.json").write_text(good)
    edit_config(d, intermediate_size=100)
    one_line_error(ValueError, r"tensor model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), "
                   r"the config implies \(100, 64\)", hf.load_pretrained, path)
    (d / "config.json").write_text(good)
    edit_config(d, tie_word_embeddings=True)  # then lm_head.weight is a copy to skip: loads
    hf.load_pretrained(path)
    (d / "config.json").write_text(good)
    del_config = json.loads(good)
    del del_config["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(del_config))
    one_line_error(ValueError, "mistral config lacks 'num_hidden_layers'", hf.load_pretrained, path)
    (d / "config.json").write_text(good)

    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.1.self_attn.k_proj" not in k}, d / "model.safetensors")
    one_line_error(ValueError, "lacks tensor model.layers.1.self_attn.k_proj.weight", hf.load_pretrained, path)
    save_file({**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, d / "model.safetensors")
    one_line_error(ValueError, "tensor model.layers.0.self_attn.q_norm.weight that its config does not explain",
                   hf.load_pretrained, path)

    monkeypatch.setattr(hf, "has_safetensors", lambda: False)
    one_line_error(FileNotFoundError, "no weights found.*needs the safetensors package", hf.load_pretrained, path)
    monkeypatch.undo()
    (d / "model.safetensors").unlink()
    one_line_error(FileNotFoundError, "no weights found; expected model.safetensors", hf.load_pretrained, path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1-of-2.safetensors"}}))
    one_line_error(FileNotFoundError, "model-1-of-2.safetensors, listed in model.safetensors.index.json, is missing",
                   hf.load_pretrained, path)
    one_line_error(FileNotFoundError, "config.json", hf.load_pretrained, str(tmp_path / "nowhere"))


def test_export_without_safetensors_writes_pytorch_model_bin(tmp_path, monkeypatch):
    ours = hf.load_pretrained(saved(hf_model("qwen3-qknorm-headdim"), tmp_path / "src")).eval()
    hf.save_pretrained(ours, str(tmp_path / "out"))  # first with safetensors ...
    monkeypatch.setattr(hf, "has_safetensors", lambda: False)
    hf.save_pretrained(ours, str(tmp_path / "out"))  # ... then without: the stale file must go
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "pytorch_model.bin"]
    idx, am, pos = ragged_batch()
    with torch.no_grad():
        torch.testing.assert_close(hf.load_pretrained(str(tmp_path / "out")).eval()(idx, pos, am), ours(idx, pos, am))
    monkeypatch.undo()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(back, idx, am, pos)[am.bool()], ours(idx, pos, am)[am.bool()],
                                   atol=1e-4, rtol=0)
