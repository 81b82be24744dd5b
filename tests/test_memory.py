"""memory.py's plan against what PyTorch actually holds, on models small enough to build."""
import pytest
import torch

from perf import memory
from model import GPT, GPTConfig, preset
from selm import sequence_logps


def test_static_parts_are_the_tensors_training_holds():
    cfg = preset("tiny", vocab_size=300, model_type="qwen2", n_kv_head=1, qkv_bias=True)
    n, p = memory.plan(cfg, ranks=1, fsdp=False, checkpointing=False, micro_pairs=1, seq=32, response=16)
    torch.manual_seed(0)
    m = GPT(cfg)
    assert n == sum(t.numel() for t in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ids = torch.randint(0, 300, (3, 32))
    resp = torch.zeros(3, 32, dtype=torch.bool)
    resp[:, 16:] = True
    sequence_logps(m, ids, resp).sum().backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert p["weights"] == nbytes(m.parameters()) and p["gradients"] == nbytes(t.grad for t in m.parameters())
    assert p["adamw"] == nbytes(v for s in opt.state.values() for v in s.values() if v.dim())
    sharded = memory.plan(cfg, ranks=8, fsdp=True, checkpointing=True, micro_pairs=1, seq=32, response=16)[1]
    assert sharded["adamw"] == p["adamw"] / 8 and sharded["activations"] < p["activations"]
    assert sharded["sampling_copy"] == p["weights"]


def test_activation_count_grows_with_width_and_mlp():
    small = memory.saved_bytes_per_token_layer(GPTConfig(n_embd=64, n_head=2, vocab_size=100, block_size=64))
    wide = memory.saved_bytes_per_token_layer(GPTConfig(n_embd=128, n_head=2, vocab_size=100, block_size=64))
    assert 1.8 < wide / small < 2.2  # linear in the width
    assert 14 * 64 * 4 < small < 20 * 64 * 4  # GPT-2: about 16 saved values per channel (LNs, qkv, MLP)


@pytest.mark.parametrize("argv,msg", [(["--seq", "0"], "0 < --response < --seq"), (["--micro", "-1"], "--micro must be"),
                                      (["--response", "2000"], "0 < --response < --seq"),
                                      (["--measure", "Nope"], "--measure Nope")])
def test_bad_flags_are_one_line_errors(argv, msg):
    with pytest.raises(SystemExit) as e:
        memory.main(argv)
    assert str(e.value).startswith("python -m perf.memory: error: ") and msg in str(e.value), str(e.value)
