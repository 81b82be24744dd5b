"""bench.py runs: its quick sampling sections and the decode-step profile (figures are not
checked here: timings belong to the benchmark, never to a test)."""
import importlib.util
import json

from perf import bench
from conftest import extra


def test_quick_sampling_and_next_token_sections_run(capsys):
    bench.main(["--quick", "--sections", "sampling,next-token"])
    out = capsys.readouterr().out
    ratios = json.loads(out.strip().splitlines()[-1])["ratios"]
    assert "next token V=1000" in ratios and "small compiled vs eager @32" in ratios


def test_profile_step(capsys):
    bench.main(["--profile-step", "--shapes", "d256"])
    out = capsys.readouterr().out
    assert "decode step profile: d256" in out and "aten::" in out


def test_quick_real_model_section_runs(tmp_path, capsys):
    """The real-model sections on a tiny random Llama with a chat tokenizer (the real model is
    the lead's to measure): TRL's DPO epoch, HF generate and a SELM iteration against ours, and
    the roofline of each hot path."""
    import pytest
    transformers = extra("transformers", "the real-model section")
    extra("jinja2", "chat templates")
    extra("tokenizers", "a chat tokenizer")
    from chat_dirs import chat_tokenizer
    V = chat_tokenizer(tmp_path, "chatml")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        bench.main(["--sections", "real"])  # no --init-from: an argparse error
    with pytest.raises(SystemExit):
        bench.main(["--sections", "roofline"])
    bench.main(["--quick", "--sections", "real,roofline", "--init-from", str(tmp_path)])
    ratios = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ratios"]
    assert "real: greedy chat answers vs HF generate" in ratios and "real: iteration: sampling" in ratios
    for path in ("prefill", "decode step", "ref log-probs", "train step", "SELM iteration"):
        for dtype in ("fp32", "bf16"):  # each hot path's FLOP/s as a share of its matmuls' own peak
            assert 0 < ratios[f"roofline: {path} {dtype}"] < 10
    assert ("real: DPO epoch vs TRL" in ratios) == (importlib.util.find_spec("trl") is not None)
