"""Every field selm reads from a Hugging Face directory is checked -- config.json, the weights'
index, tokenizer.json, tokenizer_config.json, generation_config.json, chat_template.jinja --
its type, its range and its consistency with the others, each in one line that names the
file and the field, before anything is built or trained."""
import json
import os

import pytest

import hf
import train
from conftest import extra

LLAMA = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 128}
GPT2 = {"model_type": "gpt2", "vocab_size": 300, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 4}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CONFIGS = [
    ([LLAMA], "config.json: the file must be a JSON object, got [{"),
    (dict(LLAMA, vocab_size="300"), "field 'vocab_size' must be an integer >= 1, got \"300\""),
    (dict(LLAMA, vocab_size=True), "field 'vocab_size' must be an integer >= 1, got true"),
    (dict(LLAMA, num_attention_heads=0), "field 'num_attention_heads' must be an integer >= 1, got 0"),
    (dict(LLAMA, num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(LLAMA, hidden_size=66), "hidden_size 66 is not a multiple of num_attention_heads 4, and no head_dim"),
    (dict(LLAMA, head_dim=-16), "field 'head_dim' must be an integer >= 1, got -16"),
    (dict(LLAMA, max_position_embeddings=0), "field 'max_position_embeddings' must be an integer >= 1"),
    (dict(LLAMA, intermediate_size=[96]), "field 'intermediate_size' must be an integer >= 1"),
    (dict(LLAMA, rms_norm_eps=-1e-6), "field 'rms_norm_eps' must be a finite number >= 0"),
    (dict(LLAMA, rope_theta="1e4"), "field 'rope_theta' must be a finite number > 0"),
    (dict(LLAMA, rope_theta=float("inf")), "field 'rope_theta' must be a finite number > 0"),
    (dict(LLAMA, rope_scaling="linear"), "field 'rope_scaling' must be a JSON object"),
    (dict(LLAMA, rope_scaling=dict(LLAMA3_ROPE, factor=None)), "llama config lacks 'rope_scaling.factor'"),
    (dict(LLAMA, rope_scaling=dict(LLAMA3_ROPE, high_freq_factor=1.0)), "high_freq_factor must be above"),
    (dict(LLAMA, rope_scaling=dict(LLAMA3_ROPE, original_max_position_embeddings=64.5)),
     "field 'rope_scaling.original_max_position_embeddings' must be an integer >= 1"),
    (dict(LLAMA, tie_word_embeddings="yes"), "field 'tie_word_embeddings' must be true or false"),
    (dict(LLAMA, sliding_window=-1), "field 'sliding_window' must be an integer >= 1"),
    (dict(LLAMA, layer_types="full"), "field 'layer_types' must be a list of strings"),
    (dict(LLAMA, hidden_act=["silu"]), "field 'hidden_act' must be a string"),
    (dict(LLAMA, model_type=5), "model_type 5 is not supported"),
    (dict(GPT2, n_head=3), "n_embd 64 is not a multiple of n_head 3"),
    (dict(GPT2, n_inner="big"), "field 'n_inner' must be an integer >= 1"),
    (dict(GPT2, layer_norm_epsilon="small"), "field 'layer_norm_epsilon' must be a finite number >= 0"),
]


@pytest.mark.parametrize("config,msg", CONFIGS, ids=[m[:40] for _, m in CONFIGS])
def test_config_json_fields(tmp_path, config, msg):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ") and msg in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_good_configs_load(tmp_path):
    for config in (LLAMA, GPT2, dict(LLAMA, rope_scaling=LLAMA3_ROPE, num_key_value_heads=2, head_dim=32)):
        hf.config_from_hf(config)


@pytest.mark.parametrize("index,msg", [
    ({}, "the index lacks 'weight_map'"),
    ({"weight_map": ["model-1.safetensors"]}, "field 'weight_map' must be an object of tensor names and file names"),
    ({"weight_map": {"x": "../model-1.safetensors"}}, "weight file '../model-1.safetensors' is not a file name"),
    ("{", "unreadable JSON"),
])
def test_weights_index_fields(tmp_path, index, msg):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "pytorch_model.bin.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'pytorch_model.bin.index.json'}: ") and msg in str(e.value)


@pytest.mark.parametrize("name,shape", [("model.layers.1.self_attn.k_proj.weight", (32, 60)),
                                        ("model.layers.0.mlp.up_proj.weight", (96, 63)),
                                        ("model.layers.0.self_attn.q_proj.weight", (60, 64))])
def test_a_mis_shaped_tensor_of_a_fused_group_is_one_line(tmp_path, name, shape):
    """q, k, v (and gate, up) are stacked into one matrix on load: a wrong shape among them is
    named before torch.cat sees it."""
    extra("safetensors", "the weights are model.safetensors")
    import torch
    from safetensors.torch import load_file, save_file

    from model import GPT
    torch.manual_seed(0)
    hf.save_pretrained(GPT(hf.config_from_hf(dict(LLAMA, num_key_value_heads=2))), str(tmp_path))
    sd = load_file(tmp_path / "model.safetensors")
    right = tuple(sd[name].shape)
    sd[name] = torch.zeros(shape)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: tensor {name} has shape {shape}, the config implies {right}"


# ---- the tokenizer's files ------------------------------------------------------------------

def edit(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def set_field(dotted, value):
    def change(obj):
        *parents, last = dotted.split(".")
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else obj[p]
        obj[last] = value
    return change


TOKENIZER_FILES = [
    ("tokenizer.json", "{", "unreadable JSON"),  # a JSON error, naming its file
    ("tokenizer_config.json", "{", "unreadable JSON"),
    ("generation_config.json", "[1,", "unreadable JSON"),
    ("tokenizer.json", "[]", "the file must be a JSON object"),
    ("tokenizer.json", set_field("model.vocab", ["a"]), "field 'model.vocab' must be an object of tokens and their ids"),
    ("tokenizer.json", set_field("model.merges", [1]), "field 'model.merges' must be a list of merges"),
    ("tokenizer.json", set_field("added_tokens.0.content", 5), "field 'added_tokens.0.content' must be a string"),
    ("tokenizer.json", set_field("added_tokens.0.id", -1), "field 'added_tokens.0.id' must be an integer >= 0"),
    ("tokenizer.json", set_field("pre_tokenizer", "ByteLevel"), "field 'pre_tokenizer' must be a JSON object"),
    ("tokenizer.json", set_field("pre_tokenizer.pretokenizers.0.pattern", "x"),
     "field 'pre_tokenizer.pretokenizers.0.pattern' must be a JSON object"),
    ("tokenizer.json", set_field("pre_tokenizer.pretokenizers.0.pattern.Regex", 5),
     "field 'pre_tokenizer.pretokenizers.0.pattern.Regex' must be a string"),
    ("tokenizer.json", set_field("post_processor", {"type": "TemplateProcessing", "special_tokens": {"<s>": {"ids": 1}}}),
     "field 'post_processor.special_tokens.<s>.ids' must be a list of token ids"),
    ("tokenizer.json", set_field("post_processor", {"type": "TemplateProcessing", "special_tokens": {},
                                                    "single": [{"SpecialToken": {"id": "<s>"}}]}),
     "field 'post_processor.single' begins with special token '<s>', to which 'post_processor.special_tokens' "
     "gives no ids"),
    ("tokenizer.json", set_field("post_processor", {"type": "Sequence", "processors": [
        {"type": "TemplateProcessing", "special_tokens": {"<s>": {"ids": []}},
         "single": [{"SpecialToken": {"id": "<s>"}}]}]}),
     "field 'post_processor.processors.0.single' begins with special token '<s>', to which "
     "'post_processor.processors.0.special_tokens' gives no ids"),
    ("tokenizer.json", set_field("post_processor", {"type": "TemplateProcessing", "special_tokens": {"<s>": {"ids": [
        10 ** 6]}}, "single": [{"SpecialToken": {"id": "<s>"}}]}), "gives id 1000000, not in [0, "),
    ("tokenizer.json", set_field("post_processor", {"type": "TemplateProcessing", "single": {"SpecialToken": 1}}),
     "field 'post_processor.single' must be a list of objects"),
    ("tokenizer_config.json", set_field("eos_token", 5), "field 'eos_token' must be a string or an object"),
    ("tokenizer_config.json", set_field("eos_token", {"content": 5}), "field 'eos_token.content' must be a string"),
    ("tokenizer_config.json", set_field("pad_token", "<nope>"), "field 'pad_token' names '<nope>', which is not one"),
    ("tokenizer_config.json", set_field("chat_template", 5), "field 'chat_template' must be a string, or a list"),
    ("tokenizer_config.json", set_field("chat_template", [{"name": "default"}]), "field 'chat_template' must be"),
    ("generation_config.json", set_field("eos_token_id", "2"), "field 'eos_token_id' must be a token id in [0, "),
    ("generation_config.json", set_field("eos_token_id", [2, 99999]), "field 'eos_token_id' must be a token id"),
    ("generation_config.json", set_field("pad_token_id", -1), "field 'pad_token_id' must be a token id in [0, "),
    ("chat_template.jinja", b"\xff\xfe{{ x }}", "unreadable ('utf-8' codec can't decode"),
]


def built(*args, **kw):
    raise AssertionError("the tokenizer files were accepted: the run went on to build its model")


@pytest.mark.parametrize("name,change,msg", TOKENIZER_FILES, ids=[f"{n}: {m[:40]}" for n, _, m in TOKENIZER_FILES])
def test_tokenizer_files_fields(tmp_path, monkeypatch, name, change, msg):
    """Read as a run reads them (the tokenizer, then the chat template), through train.py: one
    line naming the file and the field, nothing written."""
    extra("tokenizers", "builds tokenizer directories")
    from chat_dirs import chat_tokenizer
    monkeypatch.setattr(train, "build_model", built)
    d = tmp_path / "tok"
    chat_tokenizer(d, "chatml")
    edit(d / "tokenizer_config.json", lambda c: c.pop("pad_token"))  # padding: generation_config's, or EOS
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    path = d / name
    if callable(change):
        edit(path, change)
    else:
        path.write_bytes(change if isinstance(change, bytes) else change.encode())
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "tiny", "--bpe-path", str(d), "--out-dir", str(tmp_path / "out")])
    err = str(e.value)
    assert f"{path}: " in err and msg in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # nothing written, not even the out-dir
