"""
model.py -- a GPT-2 style causal transformer, written out by hand.

One file, one module: learned absolute positions, pre-LayerNorm blocks, a GELU MLP and an
output head tied to the token embedding. Parameter names are GPT-2's own (transformer.wte,
transformer.h.0.attn.c_attn, ...), so a Hugging Face GPT-2 checkpoint loads by transposing
its Conv1D weights and nothing else.

`GPT.forward` serves the three callers the project has:
  1. training and scoring: a full, padded batch with an optional attention mask and explicit
     position ids (left- and right-padded rows then see the same positions);
  2. sampling: a few new tokens at a time against a preallocated KV cache (`KVCache`);
  3. log-probs: the LM head applied only where the caller asks (`output_mask`), because a
     [B, T, V] logits tensor with GPT-2's 50257-word vocabulary is the largest thing in
     memory and most of it (the prompt) is never needed.

This file knows nothing of the rest of the project.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (learned positions)
    vocab_size: int = 50257  # GPT-2's BPE; the byte-level tokenizer needs 258
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5


# Architecture presets. `vocab_size` and `block_size` of the small ones are set by the caller
# from the tokenizer and the task; the GPT-2 family keeps GPT-2's own.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # ~0.1M params: tests
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),  # ~0.8M: the CPU default
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def preset(name, **overrides):
    """A GPTConfig from a preset name; keyword arguments override its fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


class KVCache:
    """Preallocated keys and values for every layer: [n_layer, B, n_head, max_len, head_dim].

    Slots are written at explicit positions (`cache_pos` in GPT.forward), so there is no
    concatenation and no reallocation while decoding.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, mask, cache=None, layer=0, cache_pos=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            # write this step's keys/values at their slots, attend over everything so far
            end = cache_pos + T
            cache.k[layer, :, :, cache_pos:end] = k
            cache.v[layer, :, :, cache_pos:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]  # (B, nh, S, hd)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None and T == 1 and dropout_p == 0.0:
            # decoding, one new token per row: attention written out is two thin batched
            # matmuls, which on one CPU thread run up to 2x faster than SDPA's fused kernel
            att = (q * (1.0 / math.sqrt(C // self.n_head))) @ k.transpose(-2, -1)  # (B, nh, 1, S)
            if mask is not None:
                att = torch.where(mask, att, float("-inf"))
            y = att.softmax(-1) @ v
        elif mask is None:  # plain causal attention over a batch with no left padding
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # explicit (B, 1, T, S) boolean mask; True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU; matching it keeps HF logits within 1e-5
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache=None, layer=0, cache_pos=0):
        x = x + self.attn(self.ln_1(x), mask, cache, layer, cache_pos)
        return x + self.mlp(self.ln_2(x))


def attention_mask_4d(attention_mask, T, cache_pos=0):
    """Boolean (B, 1, T, S) mask from a (B, S) key-padding mask, S = cache_pos + T.

    Query i sits at slot cache_pos + i and may attend to slot j when j <= its own slot and
    slot j holds a real token. We build the causal part explicitly rather than trusting
    SDPA's `is_causal`, which aligns the triangle to the top-left corner and is therefore
    wrong whenever T != S (decoding against a cache). Every query may also attend to its
    own slot: a left-padding query would otherwise see no key at all, and a fully masked
    softmax row is NaN, which would poison the batch through 0 * NaN in later matmuls.
    """
    B, S = attention_mask.shape
    q_slot = torch.arange(cache_pos, cache_pos + T, device=attention_mask.device)[:, None]
    k_slot = torch.arange(S, device=attention_mask.device)[None, :]
    causal = k_slot <= q_slot  # (T, S)
    allowed = causal & (attention_mask.bool()[:, None, :] | (k_slot == q_slot))  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)


def positions_from_mask(attention_mask):
    """Position ids (B, T) that count only real tokens: left padding does not shift them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink with depth so the sum stays O(1)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, position_ids=None, attention_mask=None, cache=None, cache_pos=0,
                output_mask=None):
        """
        idx:            (B, T) token ids
        position_ids:   (B, T) absolute positions; default cache_pos + arange(T)
        attention_mask: (B, S) 1 where a key slot holds a real token, S = cache_pos + T;
                        None means "no padding before any real token" (plain causal).
                        A (B, 1, T, S) boolean mask (True = may attend, as attention_mask_4d
                        builds it) is used as it is: a sampler builds it once, not per step.
        cache:          a KVCache to read from and write slots [cache_pos, cache_pos + T) of
        output_mask:    (B, T) bool; if given, logits only at these positions, as (N, V) in
                        row-major order, N = output_mask.sum(). Otherwise (B, T, V).
        """
        B, T = idx.shape
        if position_ids is None:
            position_ids = torch.arange(cache_pos, cache_pos + T, device=idx.device).expand(B, T)
            if cache_pos + T > self.config.block_size:
                raise ValueError(f"sequence of {cache_pos + T} tokens is longer than the model's "
                                 f"context of {self.config.block_size}")
        # (explicit position ids are the caller's to keep below block_size: checking them
        # here would cost a host-device sync on every decoding step)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask
        elif attention_mask is not None:
            mask = attention_mask_4d(attention_mask, T, cache_pos)
        elif cache_pos > 0:  # T != S: is_causal would align the triangle wrongly
            mask = attention_mask_4d(torch.ones(B, cache_pos + T, device=idx.device), T, cache_pos)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i, cache_pos)  # (B, T, C)
        x = self.transformer.ln_f(x)
        if output_mask is not None:
            x = x[output_mask]  # (N, C): the LM head runs only where it is needed
        elif cache is not None and T == 1:
            # Decoding. The same product as x @ W^T, computed as (W @ x^T)^T: with a few rows
            # against a large vocabulary, multithreaded CPU BLAS splits the V rows of W over
            # its threads far better than the B rows of x (GPT-2, 32 rows, 2 threads: ~30 ms
            # instead of ~38 ms, a tenth of the whole step).
            return (self.lm_head.weight @ x.view(B, -1).t()).t().contiguous().view(B, 1, -1)
        return self.lm_head(x)  # (B, T, V) or (N, V)

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, device or p.device, dtype or p.dtype)

    # ---- bookkeeping -----------------------------------------------------------------

    def num_params(self, non_embedding=False):
        """Parameter count (tied weights once). non_embedding drops the position table, and
        the token table too, as the scaling-law papers count them."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len, training=True):
        """Approximate FLOPs per token: 2N per matmul weight per token forward (N the
        non-embedding parameters plus the LM head) plus attention's 2 * 2 * L * T * C for
        QK^T and AV; backward is twice the forward (PaLM, appendix B)."""
        cfg = self.config
        n = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.n_embd
        fwd = 2 * n + 4 * cfg.n_layer * seq_len * cfg.n_embd
        return 3 * fwd if training else fwd

    # ---- loading ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dropout=0.0):
        """Load a Hugging Face GPT-2 directory already on disk: config.json plus
        pytorch_model.bin (or model.safetensors when `safetensors` is installed)."""
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{path}: not a GPT-2 checkpoint directory; it must contain "
                                    "config.json and pytorch_model.bin (or model.safetensors)")
        with open(cfg_file) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                           vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                           n_embd=hf["n_embd"], dropout=dropout,
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        bin_file, st_file = os.path.join(path, "pytorch_model.bin"), os.path.join(path, "model.safetensors")
        if os.path.isfile(st_file) and _has_safetensors():
            from safetensors.torch import load_file
            sd = load_file(st_file)
        elif os.path.isfile(bin_file):
            sd = torch.load(bin_file, map_location="cpu", weights_only=True)
        else:
            extra = "" if _has_safetensors() else " (model.safetensors needs the safetensors package)"
            raise FileNotFoundError(f"{path}: no weights found; expected pytorch_model.bin or "
                                    f"model.safetensors{extra}")
        model = cls(config)
        model.load_state_dict(hf_to_ours(sd, model.state_dict()))
        return model


def _has_safetensors():
    try:
        import safetensors  # noqa: F401
        return True
    except ImportError:
        return False


# Hugging Face stores these four as Conv1D, i.e. (in, out); nn.Linear wants (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_ours(hf_sd, our_sd):
    """Map a Hugging Face GPT-2 state dict onto ours: same names (GPT2Model's keys lack the
    'transformer.' prefix), Conv1D weights transposed, buffers and the tied head dropped."""
    out = {}
    for k, v in hf_sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue
        name = k if k.startswith("transformer.") else "transformer." + k
        out[name] = v.t() if name.endswith(_CONV1D) else v
    out["lm_head.weight"] = out["transformer.wte.weight"]
    missing = set(our_sd) - set(out)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    for name, v in out.items():
        if name not in our_sd or our_sd[name].shape != v.shape:
            want = tuple(our_sd[name].shape) if name in our_sd else "nothing"
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(v.shape)}, model expects {want}")
    return out
