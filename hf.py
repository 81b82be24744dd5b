"""
hf.py -- Hugging Face model directories in and out: GPT-2, Llama, Mistral, Qwen2, Qwen3.

    model = load_pretrained("Qwen2-0.5B-Instruct")       # config.json + weights -> GPT
    save_pretrained(model, "out/hf", tokenizer_dir=...)   # -> AutoModelForCausalLM loads it

A directory is a config.json (its `model_type` picks the family) and the weights: one
model.safetensors, shards listed by model.safetensors.index.json, or pytorch_model.bin.
Everything that can be wrong with one is a one-line ValueError or FileNotFoundError: an
unsupported family or option, a missing or mis-shaped tensor, a missing file.

Our parameter names are GPT-2's for every family (see model.py); `hf_names` below is the
one table that maps them onto a family's Hugging Face names, read in one direction to load
and in the other to export. Files are written atomically (files.atomic_write).
`load_model` at the end reads a stage checkpoint or a directory with its tokenizer, ready to
answer prompts as the model was trained to see them (sample.py, tools/evaluate.py).
"""

import json
import os
from dataclasses import dataclass

import torch

from chat import check_answerable, load_template, user_turn
from checkpoint import check_checkpoint_path, load_checkpoint, model_from_checkpoint, stage_path
from files import Fields, atomic_write, atomic_write_path, read_json
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED = ("gpt2", *LLAMA_FAMILY)
# Hugging Face stores these four GPT-2 weights as Conv1D, i.e. (in, out); nn.Linear wants (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Files a tokenizer directory may hold, copied next to an export so that it is complete.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def has_safetensors():
    try:
        import safetensors  # noqa: F401
        return True
    except ImportError:
        return False


# ---- configuration -------------------------------------------------------------------

def config_from_hf(hf, block_size=None, dropout=0.0, where="config.json"):
    """GPTConfig from a config.json dict, every field it reads checked (Fields). block_size:
    the context the model will be used at; default its max_position_embeddings. (GPT-2 keeps its
    n_positions, the rows of its position table: a block_size above that is an error, one below
    it changes nothing.)"""
    f = Fields(hf, where)
    mt = f.get("model_type", None)
    if mt not in SUPPORTED:
        raise ValueError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED)}")
    f.what = f"{mt} config"  # "... config lacks 'vocab_size'"
    if mt == "gpt2":
        act = f.text("activation_function", "gelu_new")
        f.check(act not in ("gelu_new", "gelu_pytorch_tanh"), f"GPT-2 activation {act!r} is not supported (gelu_new)")
        n_pos = f.count("n_positions", f.count("n_ctx", 1024))
        f.check(block_size is not None and block_size > n_pos,
                f"context of {block_size} is longer than this GPT-2's {n_pos} positions")
        n_embd, n_head = f.count("n_embd"), f.count("n_head")
        f.check(n_embd % n_head, f"n_embd {n_embd} is not a multiple of n_head {n_head}")
        return GPTConfig(block_size=n_pos, vocab_size=f.count("vocab_size"), n_layer=f.count("n_layer"),
                         n_head=n_head, n_embd=n_embd, n_inner=f.count("n_inner", None), dropout=dropout,
                         layer_norm_epsilon=f.number("layer_norm_epsilon", 1e-5, strict=False), hf_config=hf)
    act = f.text("hidden_act", "silu")
    f.check(act != "silu", f"{mt}: hidden_act {act!r} is not supported (silu)")
    f.check(f.flag("attention_bias") or f.flag("mlp_bias"), f"{mt}: attention_bias / mlp_bias are not supported")
    # transformers 5 writes rope_parameters (rope_theta inside); older files rope_scaling + rope_theta
    rope = f.nested("rope_parameters" if f.obj.get("rope_parameters") else "rope_scaling")
    kind = rope.text("rope_type", rope.text("type", "default"))
    f.check(kind not in ("default", "llama3"), f"{mt}: rope scaling type {kind!r} is not supported (default, llama3)")
    f.check(rope.number("partial_rotary_factor", f.number("partial_rotary_factor", 1.0)) != 1.0,
            f"{mt}: partial rotary embeddings are not supported")
    scaling = None
    if kind == "llama3":
        scaling = {"factor": rope.number("factor"), "low_freq_factor": rope.number("low_freq_factor"),
                   "high_freq_factor": rope.number("high_freq_factor"),
                   "original_max_position_embeddings": rope.count("original_max_position_embeddings")}
        f.check(scaling["high_freq_factor"] <= scaling["low_freq_factor"],
                "the llama3 rope scaling's high_freq_factor must be above its low_freq_factor")
    max_pos = f.count("max_position_embeddings")
    ctx = block_size or max_pos
    f.check(ctx > max_pos, f"context of {ctx} is longer than this model's max_position_embeddings {max_pos}")
    window = f.count("sliding_window", None)
    layer_types = f.get("layer_types", (), lambda v: type(v) is list and all(type(t) is str for t in v),
                        "a list of strings")
    windowed = mt == "mistral" or f.flag("use_sliding_window") or "sliding_attention" in layer_types
    # our attention sees the whole context; that equals a window only if the window covers it
    f.check(windowed and window is not None and window < ctx,
            f"{mt} uses sliding-window attention over {window} tokens, narrower than the context of {ctx} it "
            f"would be used at; load it with block_size <= {window}")
    n_embd, n_head = f.count("hidden_size"), f.count("num_attention_heads")
    n_kv_head, head_dim = f.count("num_key_value_heads", n_head), f.count("head_dim", None)
    f.check(n_head % n_kv_head, f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv_head}")
    f.check(head_dim is None and n_embd % n_head,
            f"hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}, and no head_dim is given")
    return GPTConfig(
        block_size=ctx, vocab_size=f.count("vocab_size"), n_layer=f.count("num_hidden_layers"),
        n_head=n_head, n_embd=n_embd, dropout=dropout, bias=False,
        layer_norm_epsilon=f.number("rms_norm_eps", 1e-6, strict=False), model_type=mt,
        n_kv_head=n_kv_head, head_dim=head_dim, n_inner=f.count("intermediate_size"),
        rope_theta=rope.number("rope_theta", f.number("rope_theta", 10000.0)),
        rope_scaling=scaling, qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
        tie_embeddings=f.flag("tie_word_embeddings"), hf_config=hf)


def hf_config(config, dtype=torch.float32):
    """The config.json dict for an export: the source's own (every field it had round-trips)
    when the model was loaded from one, else one written from our fields."""
    if config.hf_config:
        cfg = dict(config.hf_config)
    elif not config.llama:
        if not (config.bias and config.tie_embeddings):
            raise ValueError("a GPT-2 checkpoint has biases and a tied head; this model lacks one")
        cfg = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=config.vocab_size,
                   n_positions=config.block_size, n_ctx=config.block_size, n_embd=config.n_embd,
                   n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner,
                   layer_norm_epsilon=config.layer_norm_epsilon, activation_function="gelu_new",
                   tie_word_embeddings=True)
    else:
        mt = config.model_type
        if mt not in LLAMA_FAMILY:
            raise ValueError(f"model_type {mt!r} cannot be exported; supported: {', '.join(SUPPORTED)}")
        # each family's checkpoint format fixes these switches; anything else it cannot express
        if config.bias or config.qkv_bias != (mt == "qwen2") or config.qk_norm != (mt == "qwen3"):
            raise ValueError(f"a {mt} checkpoint cannot express bias={config.bias}, "
                             f"qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}")
        cfg = dict(model_type=mt, architectures=[LLAMA_FAMILY[mt]], vocab_size=config.vocab_size,
                   hidden_size=config.n_embd, intermediate_size=config.n_inner,
                   num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                   num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, hidden_act="silu",
                   max_position_embeddings=config.block_size, rms_norm_eps=config.layer_norm_epsilon,
                   rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
                   rope_scaling={**config.rope_scaling, "rope_type": "llama3"} if config.rope_scaling else None,
                   sliding_window=None, use_sliding_window=False)
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


# ---- tensor names --------------------------------------------------------------------

def hf_names(model):
    """[(our tensor name, [its Hugging Face names])] for every tensor of `model` that a
    checkpoint stores. One name is a rename; several are stacked along dim 0 into ours (the
    Llama family's separate q, k, v into c_attn and gate, up into c_fc). A tied head is
    stored once, as the token embedding. GPT-2's names are ours (its Conv1D weights
    transposed, see _CONV1D)."""
    config = model.config
    if not config.llama:
        return [(n, [n]) for n in model.state_dict() if n != "lm_head.weight"]
    names = [("transformer.wte.weight", ["model.embed_tokens.weight"])]
    for i in range(config.n_layer):
        o, h = f"transformer.h.{i}.", f"model.layers.{i}."
        names += [(o + "ln_1.weight", [h + "input_layernorm.weight"]),
                  (o + "attn.c_attn.weight", [h + f"self_attn.{p}_proj.weight" for p in "qkv"]),
                  (o + "attn.c_proj.weight", [h + "self_attn.o_proj.weight"]),
                  (o + "ln_2.weight", [h + "post_attention_layernorm.weight"]),
                  (o + "mlp.c_fc.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"]),
                  (o + "mlp.c_proj.weight", [h + "mlp.down_proj.weight"])]
        if config.qkv_bias:
            names.append((o + "attn.c_attn.bias", [h + f"self_attn.{p}_proj.bias" for p in "qkv"]))
        if config.qk_norm:
            names += [(o + "attn.q_norm.weight", [h + "self_attn.q_norm.weight"]),
                      (o + "attn.k_norm.weight", [h + "self_attn.k_norm.weight"])]
    names.append(("transformer.ln_f.weight", ["model.norm.weight"]))
    if not config.tie_embeddings:
        names.append(("lm_head.weight", ["lm_head.weight"]))
    return names


def _stacked_sizes(name, config):
    """Row counts of the Hugging Face tensors stacked into our `name` (see hf_names)."""
    if "c_attn" in name:
        return [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
    return [config.n_inner] * 2  # c_fc: gate, up


def _ignorable(name):
    # buffers some checkpoints carry (GPT-2's causal mask, old Llamas' rotary frequencies), and
    # a tied head's copy of the embedding
    return name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")) or name == "lm_head.weight"


def hf_to_ours(hf_sd, model, where="checkpoint"):
    """Our state dict from a Hugging Face one, checked tensor by tensor against `model`."""
    gpt2 = not model.config.llama
    if gpt2:  # GPT2Model's keys lack GPT2LMHeadModel's "transformer." prefix
        hf_sd = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v
                 for k, v in hf_sd.items()}
    want, out, used = model.state_dict(), {}, set()
    for ours, theirs in hf_names(model):
        lacking = [n for n in theirs if n not in hf_sd]
        if lacking:
            raise ValueError(f"{where} lacks tensor {lacking[0]}")
        parts = [hf_sd[n] for n in theirs]
        bad = next((n for n, p in zip(theirs, parts) if not isinstance(p, torch.Tensor)), None)
        if bad:
            raise ValueError(f"{where}: {bad} is a {type(hf_sd[bad]).__name__}, not a tensor")
        if len(parts) > 1:  # stacked along dim 0 into ours: each one checked first
            for n, p, rows in zip(theirs, parts, _stacked_sizes(ours, model.config)):
                if p.shape != (rows, *want[ours].shape[1:]):
                    raise ValueError(f"{where}: tensor {n} has shape {tuple(p.shape)}, the config implies "
                                     f"{(rows, *want[ours].shape[1:])}")
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        t = t.t() if gpt2 and ours.endswith(_CONV1D) else t
        if t.shape != want[ours].shape:
            raise ValueError(f"{where}: tensor {' + '.join(theirs)} has shape {tuple(t.shape)}, the "
                             f"config implies {tuple(want[ours].shape)}")
        out[ours] = t.to(want[ours].dtype).contiguous()
        used.update(theirs)
    extra = sorted(k for k in hf_sd if k not in used and not _ignorable(k))
    if extra:
        raise ValueError(f"{where} has tensor {extra[0]} that its config does not explain "
                         f"({len(extra)} such tensors)")
    if model.config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def ours_to_hf(model):
    """The Hugging Face state dict of `model`: contiguous CPU tensors, none sharing memory."""
    sd, config, out = model.state_dict(), model.config, {}
    for ours, theirs in hf_names(model):
        t = sd[ours].detach().cpu()
        t = t.t() if not config.llama and ours.endswith(_CONV1D) else t
        parts = t.split(_stacked_sizes(ours, config)) if len(theirs) > 1 else [t]
        out.update({n: p.contiguous().clone() for n, p in zip(theirs, parts)})
    return out


# ---- files ---------------------------------------------------------------------------

def read_weights(path):
    """Every tensor of a directory: model.safetensors, or the shards its index lists; else
    pytorch_model.bin, or the shards its index lists."""
    kinds = (("model.safetensors", "model.safetensors.index.json"),
             ("pytorch_model.bin", "pytorch_model.bin.index.json"))
    for single, index in kinds if has_safetensors() else kinds[1:]:
        if os.path.isfile(os.path.join(path, single)):
            files = [single]
        elif os.path.isfile(os.path.join(path, index)):
            files = shard_files(os.path.join(path, index))
        else:
            continue
        sd = {}
        for f in files:
            file = os.path.join(path, f)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path}: weights file {f}, listed in {index}, is missing")
            try:
                if f.endswith(".safetensors"):
                    from safetensors.torch import load_file
                    sd.update(load_file(file))
                else:
                    sd.update(torch.load(file, map_location="cpu", weights_only=True))
            except Exception as e:  # truncated, corrupted, or not a weights file at all
                raise ValueError(f"{file}: unreadable weights ({type(e).__name__})") from None
        return sd
    extra = "" if has_safetensors() else " (model.safetensors needs the safetensors package)"
    raise FileNotFoundError(f"{path}: no weights found; expected model.safetensors, "
                            f"pytorch_model.bin, or a sharded index of either{extra}")


def shard_files(index):
    """The weight files a *.index.json lists: plain file names in its directory."""
    weight_map = Fields(read_json(index), index, "the index").get(
        "weight_map", ..., lambda v: type(v) is dict and v and all(type(f) is str for f in v.values()),
        "an object of tensor names and file names")
    for f in weight_map.values():
        if os.path.basename(f) != f or f in ("", ".", ".."):
            raise ValueError(f"{index}: weight file {f!r} is not a file name in its directory")
    return sorted(set(weight_map.values()))


def load_pretrained(path, dropout=0.0, block_size=None):
    """A GPT from a Hugging Face directory on disk: GPT-2, Llama, Mistral, Qwen2 or Qwen3.
    block_size: the context it will be used at (see config_from_hf). Weights come back float32."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory; it must contain config.json "
                                "and the weights (model.safetensors, shards, or pytorch_model.bin)")
    config = config_from_hf(read_json(cfg_file), block_size, dropout, cfg_file)
    hf_sd = read_weights(path)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = GPT(config)
    model.load_state_dict(hf_to_ours(hf_sd, model, path), assign=True)
    if config.tie_embeddings:  # assign=True gave the two names two Parameters: tie them again
        model.lm_head.weight = model.transformer.wte.weight
    return model


def save_pretrained(model, path, tokenizer_dir=None):
    """Write `model` as a Hugging Face directory that transformers' AutoModelForCausalLM
    loads, in its family's own format: config.json, then model.safetensors (pytorch_model.bin
    without the safetensors package), and the tokenizer's files from tokenizer_dir if given."""
    dtype = model.transformer.wte.weight.dtype
    cfg, sd = hf_config(model.config, dtype), ours_to_hf(model)
    sources = []
    if tokenizer_dir is not None:
        sources = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]
        if "tokenizer.json" not in sources and "vocab.json" not in sources:
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files "
                                    "(tokenizer.json, or vocab.json + merges.txt)")
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, "config.json"), lambda f: json.dump(cfg, f, indent=2), binary=False)
    if has_safetensors():
        from safetensors.torch import save_file
        weights = "model.safetensors"
        atomic_write_path(os.path.join(path, weights), lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    else:
        weights = "pytorch_model.bin"
        atomic_write(os.path.join(path, weights), lambda f: torch.save(sd, f))
    # weights of an earlier export in another format would shadow these: transformers prefers
    # safetensors and reads an index before a single file
    for stale in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json"):
        if stale != weights and os.path.isfile(os.path.join(path, stale)):
            os.unlink(os.path.join(path, stale))
    for f in sources:
        with open(os.path.join(tokenizer_dir, f), "rb") as src:
            data = src.read()
        atomic_write(os.path.join(path, f), lambda out: out.write(data))


# ---- a run's stages as Hugging Face directories -------------------------------------------

def export_stages(which, out_dir, stages, tokenizer_dir=None):
    """Write the checkpoints of the chosen stages as Hugging Face directories
    <out_dir>/hf-<stage>/, tokenizer files included when the run's tokenizer came from a
    directory. which: "last", "all", or stage names separated by commas ("" exports nothing).
    Call with the stages' checkpoints on disk; check_stages(which, stages) first."""
    written = []
    for stage in check_stages(which, stages):
        model = model_from_checkpoint(load_checkpoint(stage_path(out_dir, stage)), stage_path(out_dir, stage))
        save_pretrained(model, os.path.join(out_dir, f"hf-{stage}"), tokenizer_dir)
        written.append(os.path.join(out_dir, f"hf-{stage}"))
    return written


def check_stages(which, stages):
    """The stages --export names, in run order; a name that is no stage of the run is an error."""
    if not which:
        return []
    if which in ("last", "all"):
        return stages[-1:] if which == "last" else list(stages)
    names = [s.strip() for s in which.split(",") if s.strip()]
    unknown = [s for s in names if s not in stages]
    if unknown:
        raise ValueError(f"--export {which}: {', '.join(unknown)} is no stage of this run "
                         f"({', '.join(stages)}; or 'last', 'all')")
    return [s for s in stages if s in names]


# ---- a model to answer prompts: a stage checkpoint or a directory ---------------------------

@dataclass
class Loaded:
    """A model ready to answer: its weights, its tokenizer, and how a user's text becomes its
    prompt. conversational: the text is one user turn in the chat template (a chat model, or
    a run on conversations); otherwise prompt_template, "{prompt}" standing for the text (a
    run's stored template, e.g. "sort: {prompt}\n"). ckpt: the stage checkpoint's dict."""
    model: GPT
    tok: object
    template: object  # chat.ChatTemplate, or None
    conversational: bool = False
    prompt_template: str = "{prompt}"
    ckpt: dict = None

    def prompt(self, x):
        """A user's text, or a conversation (a list of messages), written as the model saw its
        prompts in training."""
        if not (self.conversational or isinstance(x, list)):
            return self.prompt_template.replace("{prompt}", x)
        if self.template is None:
            raise ValueError("a conversation needs a chat template, and this model has none")
        return self.template.prompt(check_answerable(user_turn(x, "prompt")))


    def encode(self, x):
        """prompt(x) in token ids; a ValueError when they leave no room in the model's context."""
        ids, block = self.tok.encode_prompt(self.prompt(x)), self.model.config.block_size
        if len(ids) >= block:
            raise ValueError(f"the prompt's {len(ids)} tokens leave no room in the model's context of {block}")
        return ids


def check_model_path(path):
    """A one-line FileNotFoundError unless `path` is a stage checkpoint file or a Hugging Face
    model directory (config.json)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if os.path.isdir(path) and not any(f.endswith(".pt") for f in os.listdir(path)):
        raise FileNotFoundError(f"{path} is a directory holding neither a Hugging Face model (config.json) nor "
                                "checkpoints")
    check_checkpoint_path(path)  # one naming the directory's checkpoints, or a missing file


def load_model(path, device="cpu"):
    """A stage checkpoint (.pt) or a Hugging Face directory as a Loaded model on `device`."""
    check_model_path(path)
    if os.path.isdir(path):
        tok = get_tokenizer(path, verbose=False)  # one line when the directory has no tokenizer files
        model, template, ckpt = load_pretrained(path), load_template(tok), None
        conversational, prompt_template = template is not None, "{prompt}"
    else:
        ckpt = load_checkpoint(path)
        model, tok = model_from_checkpoint(ckpt, path), checkpoint_tokenizer(ckpt, path)
        template, conversational = load_template(tok), bool(ckpt.get("conversational"))
        prompt_template = ckpt.get("prompt_template", "{prompt}")
        if conversational and template is None:
            raise ValueError(f"{path} was trained on conversations, but {tok.source} has no chat template")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: its tokenizer has {tok.vocab_size} ids, the model only {model.config.vocab_size}")
    try:
        model = model.to(device).eval()
    except (AssertionError, RuntimeError) as e:  # e.g. cuda on a PyTorch built without it
        raise ValueError(f"device {device}: {str(e).splitlines()[0]}") from None
    return Loaded(model, tok, template, conversational, prompt_template, ckpt)


def checkpoint_tokenizer(ckpt, path):
    """The tokenizer a checkpoint was trained with: its name and the directory it came from
    are stored in it. Another tokenizer would turn the prompt into ids the model never saw,
    and nothing would say so: a mismatch is an error."""
    saved = ckpt.get("tokenizer") or {}  # absent (a hand-made checkpoint): the default tokenizer
    name, source = (saved, None) if isinstance(saved, str) else (saved.get("name"), saved.get("source"))
    if source is not None and not os.path.isdir(source):
        raise ValueError(f"checkpoint {path} was trained with the tokenizer in {source}, which is not there")
    tok = get_tokenizer(source, verbose=False)
    if (name is not None and tok.name != name) or tok.vocab_size > ckpt["model_config"]["vocab_size"]:
        raise ValueError(f"checkpoint {path} was trained with tokenizer {name!r} "
                         f"({source or 'built in, or tiktoken cache'}), but this machine gives {tok.name!r}")
    return tok
