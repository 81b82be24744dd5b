"""
reward.py -- a reward model as the judge: `--judge rm:DIR`.

A reward model is a Hugging Face *ForSequenceClassification directory (GPT2, Llama, Mistral,
Qwen2, Qwen3): the causal trunk of the family's language model and a `score` head, a Linear
from the last hidden state to one number, read at the last real token of prompt + response.
The trunk here is selm's own GPT (model.GPT.hidden), loaded by hf.py, so transformers is not
needed to run one:

    judge = load_judge("path/to/rm", device="cuda")
    judge(prompt, ["answer 1", "answer 2"])        -> [reward 1, reward 2]
    judge.batch(prompts, candidate_lists)          -> a list of rewards per prompt

What is scored is what transformers (and TRL's online trainers) would score. A reward model
with a chat template of its own gets the conversation -- the prompt's messages, which a
rendered prompt carries (chat.py), else the prompt as one user turn -- with the candidate as
the assistant's turn, rendered by that template and encoded as apply_chat_template encodes
it. One without a template gets prompt text + response text, encoded as its tokenizer
encodes a text (its BOS first, if it has one).
"""

import dataclasses
import os

import torch
import torch.nn as nn

from chat import load_template
from files import Fields, read_json
from hf import config_from_hf, hf_to_ours, read_weights
from model import GPT
from tokenizer import get_tokenizer


class RewardModel(nn.Module):
    """GPT's trunk and a score head: (B, T) right-padded ids and their lengths -> (B,) rewards."""

    def __init__(self, config):
        super().__init__()
        # the trunk's LM head is never used: tie it, so that it costs no memory
        self.trunk = GPT(dataclasses.replace(config, tie_embeddings=True))
        self.score = nn.Linear(config.n_embd, 1, bias=False)

    def forward(self, idx, lengths):
        # right padding: causal attention keeps every real token's state free of the pads after it
        h = self.trunk.hidden(idx)  # (B, T, C)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C): the last real token
        return self.score(last).squeeze(-1).float()


def load_reward_model(path):
    """A RewardModel from a Hugging Face *ForSequenceClassification directory."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    hf = read_json(cfg_file)
    archs = Fields(hf, cfg_file).get("architectures", [], lambda v: type(v) is list and all(type(a) is str for a in v),
                                     "a list of class names")
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{path} is not a sequence classifier: its config.json's architectures are {archs}; a reward "
                         "model is a *ForSequenceClassification (GPT2, Llama, Qwen2, Qwen3) with a score head")
    config = config_from_hf(hf, where=cfg_file)
    sd = read_weights(path)
    score = sd.pop("score.weight", None)
    if score is None or score.shape != (1, config.n_embd):
        got = "no tensor score.weight" if score is None else f"score.weight of shape {tuple(score.shape)}"
        raise ValueError(f"{path} has {got}; a reward model's head is one output, (1, {config.n_embd})")
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = RewardModel(config)
    trunk = hf_to_ours(sd, model.trunk, path)
    model.load_state_dict({**{"trunk." + k: v for k, v in trunk.items()}, "score.weight": score.float()}, assign=True)
    model.trunk.lm_head.weight = model.trunk.transformer.wte.weight  # assign=True untied them
    return model.eval()


class RewardJudge:
    """judge(prompt, candidates) -> rewards, with the reward model's own tokenizer and template.
    batch() scores many prompts' candidates in batches of about `batch_tokens` tokens, the
    sequences sorted by length so that little is padding; to(device) moves the model."""

    def __init__(self, model, tok, template, name, device="cpu", batch_tokens=16384):
        self.model, self.tok, self.template, self.name = model, tok, template, name
        self.batch_tokens = batch_tokens
        self.to(device)

    def to(self, device):
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def __call__(self, prompt, candidates):
        return self.batch([prompt], [candidates])[0]

    def __repr__(self):
        return f"RewardJudge({self.name})"

    def encode(self, prompt, response):
        """The token ids the reward model reads for `response` to `prompt`."""
        if self.template is None:
            bos = [] if self.tok.bos_id is None else [self.tok.bos_id]
            return bos + self.tok.encode(str(prompt) + response, allow_special=True)
        messages = getattr(prompt, "messages", None) or [{"role": "user", "content": str(prompt)}]
        text = self.template.render(messages + [{"role": "assistant", "content": response}])
        return self.tok.encode(text, allow_special=True)

    @torch.no_grad()
    def batch(self, prompts, candidate_lists):
        seqs = [self.encode(p, c) for p, cs in zip(prompts, candidate_lists) for c in cs]
        limit = self.model.trunk.config.block_size
        owner = [i for i, cs in enumerate(candidate_lists) for _ in cs]
        for s, i in zip(seqs, owner):
            if len(s) > limit:
                raise ValueError(f"prompt {str(prompts[i])[:40]!r} with a response is {len(s)} tokens, longer than "
                                 f"the reward model's context of {limit}")
        order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
        rewards = [0.0] * len(seqs)
        start = 0
        while start < len(order):
            # as many sequences as fit batch_tokens at the length of the longest (the last one, sorted)
            end = start + 1
            while end < len(order) and (end + 1 - start) * len(seqs[order[end]]) <= self.batch_tokens:
                end += 1
            rows = [seqs[j] for j in order[start:end]]
            T = len(rows[-1])
            idx = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=self.device)
            lengths = torch.tensor([len(r) for r in rows], device=self.device)
            for j, r in zip(order[start:end], self.model(idx, lengths).tolist()):
                rewards[j] = r
            start = end
        out, k = [], 0
        for cs in candidate_lists:
            out.append(rewards[k:k + len(cs)])
            k += len(cs)
        return out


def load_judge(path, device="cpu"):
    """The judge of `--judge rm:DIR`: the reward model in `path`, its tokenizer and its chat
    template (if it has one), on `device`."""
    model = load_reward_model(path)
    tok = get_tokenizer(path, verbose=False)
    if tok.vocab_size > model.trunk.config.vocab_size:
        raise ValueError(f"{path}: its tokenizer has {tok.vocab_size} ids, the model only "
                         f"{model.trunk.config.vocab_size}")
    return RewardJudge(model, tok, load_template(tok), f"rm:{path}", device or "cpu")
