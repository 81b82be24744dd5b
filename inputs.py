"""
inputs.py -- what a run starts from: its tokenizer, its data and its model.

  tokenizer  GPT-2's BPE for GPT-2 weights, else whatever tokenizer.get_tokenizer finds;
  data       the built-in sorting task (task.py), or the user's JSON Lines files and judge
             (conversations rendered with the tokenizer directory's chat template, chat.py);
  model      a fresh preset sized for the tokenizer, or a Hugging Face directory on disk
             (GPT-2, Llama, Mistral, Qwen2, Qwen3: hf.py).
Each function takes the run's configuration (train.Config) and fails with one line that
names the problem, before anything is trained.
"""

import os

import chat
import data
import task as sorting
from hf import load_pretrained
from model import GPT, preset


def tokenizer_and_data(cfg, rt):
    """The run's tokenizer and data: conversations are rendered with the chat template of the
    tokenizer's directory, and a reward-model judge runs on the training device."""
    tok = get_tokenizer(cfg, verbose=rt.ranks.main)
    return tok, load_data(cfg, chat.load_template(tok), rt.device)


def load_data(cfg, template=None, device=None):
    """The built-in task, or the user's JSONL files and judge (data.load_user_data: `template`
    renders conversations, `device` is where a reward model judges)."""
    if not any([cfg.sft, cfg.prefs, cfg.prompts, cfg.judge]):
        t = sorting.make_task(seed=cfg.task_seed, n_sft=cfg.n_sft, n_prompts_per_chunk=cfg.chunk_size,
                              n_chunks=cfg.iterations + 1, n_eval=cfg.n_eval, min_len=cfg.min_len, max_len=cfg.max_len)
        return data.TrainingData(t.sft, t.chunks, t.eval, sorting.judge, builtin=True,
                                 prompt_template=sorting.make_prompt("{prompt}"))
    if not (cfg.prefs and cfg.prompts and cfg.judge):
        raise ValueError("your own data needs --prefs, --prompts and --judge together "
                         "(the built-in judge only scores the sorting task); --sft is optional")
    if cfg.sft is None and cfg.init_from is None and cfg.sft_steps > 0:
        raise ValueError("--prefs without --sft: give --sft demonstrations, or --init-from a "
                         "pretrained model with --sft-steps 0")
    return data.load_user_data(cfg.sft, cfg.prefs, cfg.prompts, cfg.judge, cfg.iterations + 1, template, device)


def get_tokenizer(cfg, verbose=True):
    """The tokenizer of --bpe-path or of the --init-from directory (its tokenizer.json, or
    GPT-2's vocab/merges files); without either, whatever data.get_tokenizer finds."""
    path = cfg.bpe_path
    if path is None and cfg.init_from and any(os.path.isfile(os.path.join(cfg.init_from, f))
                                              for f in ("tokenizer.json", "vocab.bpe", "merges.txt")):
        path = cfg.init_from
    tok = data.get_tokenizer(path, verbose=verbose)
    if cfg.init_from and tok.name == "bytes":
        raise ValueError(f"--init-from {cfg.init_from} has no tokenizer files and none is on this machine: "
                         "put its tokenizer.json (or GPT-2's merges.txt and vocab.json) in that directory "
                         "or in --bpe-path")
    return tok


def build_model(cfg, tok, rt):
    """A fresh --model preset sized for the tokenizer, or the --init-from weights."""
    if cfg.init_from:
        model = load_pretrained(cfg.init_from, dropout=cfg.dropout, block_size=cfg.block_size)
    else:
        model = GPT(preset(cfg.model, vocab_size=tok.vocab_size, dropout=cfg.dropout, block_size=cfg.block_size))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids, the model only {model.config.vocab_size}")
    rt.say(f"model: {cfg.init_from or cfg.model}, {model.num_params() / 1e6:.2f}M parameters, device {rt.device}"
           + (f", {rt.ranks.world} processes" if rt.ranks.world > 1 else ""))
    return model.to(rt.device)
