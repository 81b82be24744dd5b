"""
model.py -- a causal transformer written out by hand: GPT-2, or the Llama family by configuration.

One file, one module. GPT-2 (learned absolute positions, pre-LayerNorm blocks, a GELU MLP, an
output head tied to the token embedding) is the default; `model_type` "llama", "mistral",
"qwen2" or "qwen3" switches the same classes to the Llama family's choices: rotary positions,
RMSNorm, a SwiGLU MLP, grouped-query attention, and the few per-family variants (Qwen2's q/k/v
biases, Qwen3's per-head q/k norms and wider heads, tied or untied output head). Each switch is
a line or two next to GPT-2's code, with a comment saying why the family made that choice.

Parameter names are GPT-2's own for both families (transformer.wte, transformer.h.0.attn.c_attn,
...): one set of module names keeps one Block and one attention class that read the same for
both families. hf.py translates at the door: a Hugging Face GPT-2 checkpoint by transposing its
Conv1D weights, a Llama-family one through an explicit name table (its separate q/k/v and
gate/up matrices stacked into our fused c_attn and c_fc, so each runs as one matmul).

`GPT.forward` serves the three callers the project has:
  1. training and scoring: a full, padded batch with an optional attention mask and explicit
     position ids (left- and right-padded rows then see the same positions);
  2. sampling: a few new tokens at a time against a preallocated KV cache (`KVCache`);
  3. log-probs: the LM head applied only where the caller asks (`output_mask`), because a
     [B, T, V] logits tensor with a 50k-150k-word vocabulary is the largest thing in memory
     and most of it (the prompt) is never needed.
It is `GPT.hidden` (embeddings -> blocks -> final norm) followed by `GPT.head` (the LM head),
so that the trunk alone can be torch.compile'd: the head's boolean selection has a
data-dependent shape.

This file knows nothing of the rest of the project; hf.py reads and writes Hugging Face
directories.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (GPT-2: the rows of its position table)
    vocab_size: int = 50257  # GPT-2's BPE; the byte-level tokenizer needs 258
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = None  # biases in every Linear and LayerNorm (GPT-2: yes, Llama family: no); None = the family's
    layer_norm_epsilon: float = 1e-5  # LayerNorm's epsilon, or RMSNorm's (Llama family)
    # The Llama family. model_type is Hugging Face's name; anything but "gpt2" means rotary
    # positions, RMSNorm and SwiGLU. The fields below default to GPT-2's shapes.
    model_type: str = "gpt2"
    n_kv_head: int = None  # grouped-query attention: fewer K/V heads than query heads; None = n_head
    head_dim: int = None  # None = n_embd // n_head (Qwen3 sets wider heads)
    n_inner: int = None  # MLP hidden width; None = 4 * n_embd
    rope_theta: float = 10000.0  # rotary base: the longest wavelength is ~ 2 pi theta positions
    rope_scaling: dict = None  # Llama-3.1's "llama3" rescaling of the rotary frequencies
    qkv_bias: bool = False  # Qwen2: biases on q, k, v only (Qwen found them to help length extrapolation)
    qk_norm: bool = False  # Qwen3 RMS-normalises every head's q and k, bounding attention logits
    tie_embeddings: bool = True  # the LM head reuses the token embedding (GPT-2, small Llamas)
    hf_config: dict = None  # the source config.json, kept so that export can round-trip it

    def __post_init__(self):
        self.bias = not self.llama if self.bias is None else self.bias
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.n_inner = self.n_inner or 4 * self.n_embd
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        assert self.llama or self.n_embd % self.n_head == 0, "GPT-2: n_embd must be a multiple of n_head"

    @property
    def llama(self):
        return self.model_type != "gpt2"


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
    """Preallocated keys and values, one (B, n_kv_head, max_len, head_dim) tensor per layer:
    k[i], v[i] for layer i.

    Slots are written at explicit positions (`cache_pos` in GPT.forward), so there is no
    concatenation and no reallocation while decoding. With grouped-query attention only the
    n_kv_head shared heads are stored: the cache is n_head / n_kv_head times smaller. One
    tensor per layer, not one for all layers: a compiled step that writes a slot of a shared
    tensor copies all of it at every step (sampler.py's StaticCache builds on this class).
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019): LayerNorm without the
    centring and the bias, which cost time and buy nothing measurable. Computed in float32,
    as the Llama family's reference code does, then cast back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def norm(config, dim):
    # the Llama family swaps LayerNorm for the cheaper RMSNorm
    if config.llama:
        return RMSNorm(dim, config.layer_norm_epsilon)
    return nn.LayerNorm(dim, eps=config.layer_norm_epsilon, bias=config.bias)


def rope_frequencies(config, device=None):
    """The rotary angular frequencies theta^(-2i/d), i < d/2, d = head_dim (RoFormer, eq. 15):
    (head_dim / 2,) float32.

    Llama 3.1's "llama3" scaling stretches the context without retraining the short-range
    heads: frequencies whose wavelength 2 pi / f is longer than original_context /
    low_freq_factor are divided by `factor` (position interpolation), those shorter than
    original_context / high_freq_factor are kept, and the band between is blended linearly in
    original_context / wavelength.
    """
    d = config.head_dim
    f = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    s = config.rope_scaling
    if s:
        waves = s["original_max_position_embeddings"] * f / (2 * math.pi)  # waves per original context
        keep = ((waves - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        f = (1 - keep) * f / s["factor"] + keep * f
    return f


def rotary(config, position_ids):
    """cos and sin of each position's rotation angles, from the explicit position ids (so a
    left-padded row rotates exactly as it would unpadded): two (B, 1, T, head_dim / 2)."""
    angles = position_ids[:, None, :, None].float() * rope_frequencies(config, position_ids.device)
    return angles.cos(), angles.sin()


def linear(layer, x, decode=False):
    """layer(x). decode: x (B, 1, in) holds one new token per row, and a large product is
    computed as (W @ x^T)^T instead of x @ W^T: the same numbers up to float rounding, but
    with a few rows against a large matrix, multithreaded CPU BLAS splits the rows of W over
    its threads far better than the B rows of x (GPT-2's width on 2 cores: the whole decode
    step 11% faster; on CUDA no different). The result is a transposed view (B, 1, out): no
    copy, the next op reads it as it is. Below half a million weights (a model of width 256)
    the split gains nothing and the transposed result costs the next ops more: x @ W^T."""
    if not decode or layer.weight.numel() < 1 << 19:
        return layer(x)
    xt = x.view(x.size(0), -1).t()  # (in, B)
    y = layer.weight @ xt if layer.bias is None else torch.addmm(layer.bias[:, None], layer.weight, xt)
    return y.t()[:, None]  # (out, B) -> (B, 1, out)


def apply_rotary(x, cos, sin):
    """Rotate the pairs (x_i, x_{i + d/2}) of every head of x (B, h, T, d) by the angles
    (RoFormer eq. 34, with the pairs split in halves as the Llama family's weights expect).
    q.k then depends on positions only through their difference."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        nh, nkv, hd = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v come out of one matmul; with grouped-query attention k and v are narrower
        self.c_attn = nn.Linear(config.n_embd, (nh + 2 * nkv) * hd, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(nh * hd, config.n_embd, bias=config.bias)
        if config.qk_norm:  # Qwen3: per-head RMSNorm of q and k, before the rotation (stable logits)
            self.q_norm = RMSNorm(hd, config.layer_norm_epsilon)
            self.k_norm = RMSNorm(hd, config.layer_norm_epsilon)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head, self.head_dim = nh, nkv, hd
        self.qk_norm, self.dropout = config.qk_norm, config.dropout

    def forward(self, x, mask, rope=None, cache=None, layer=0, cache_pos=0):
        B, T, C = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        dropout_p = self.dropout if self.training else 0.0
        decode = cache is not None and T == 1  # one new token per row
        q, k, v = linear(self.c_attn, x, decode).split([nh * hd, nkv * hd, nkv * hd], dim=2)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None and torch.is_tensor(cache_pos):
            # sampler.py's decode step: the slots are a tensor (T,), so a compiled step is one
            # graph for every token. Attention reads the first S slots of the cache, S the
            # mask's width: the whole cache (fixed shapes, compiled) or the slots written so
            # far (eager); the mask hides the slots within not written yet
            kc, vc = cache.k[layer], cache.v[layer]  # (B, nkv, max_len, hd)
            kc.index_copy_(2, cache_pos, k.to(kc.dtype))  # (under autocast k may be bf16)
            vc.index_copy_(2, cache_pos, v.to(vc.dtype))
            k, v = kc[:, :, :mask.size(-1)], vc[:, :, :mask.size(-1)]  # (B, nkv, S, hd)
        elif cache is not None:
            # write this step's keys/values at their slots, attend over everything so far
            end = cache_pos + T
            cache.k[layer][:, :, cache_pos:end] = k
            cache.v[layer][:, :, cache_pos:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]  # (B, nkv, S, hd)
        gqa = nkv != nh  # query head h reads K/V head h // (nh // nkv)
        if decode and dropout_p == 0.0:
            # decoding, one new token per row: attention written out is two thin batched
            # matmuls, which on one CPU thread run up to 2x faster than SDPA's fused kernel.
            # The nh // nkv query heads sharing a K/V head are rows of one matmul against it,
            # so the cache is read as it is, never expanded to nh heads.
            q = q.reshape(B, nkv, nh // nkv, hd)
            att = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)  # (B, nkv, nh // nkv, S)
            if mask is not None:
                att = torch.where(mask, att, float("-inf"))
            y = (att.softmax(-1) @ v).view(B, nh, 1, hd)
        elif mask is None:  # plain causal attention over a batch with no left padding
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        else:  # explicit (B, 1, T, S) boolean mask; True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.resid_dropout(linear(self.c_proj, y, decode))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        # SwiGLU (Shazeer, 2020), the Llama family's MLP: silu(gate) * up, a learned gate that
        # beats GELU at equal parameters. c_fc holds [gate; up] stacked: one matmul for both.
        self.swiglu = config.llama
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * config.n_inner, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, decode=False):
        if self.swiglu:
            gate, up = linear(self.c_fc, x, decode).chunk(2, dim=-1)
            return self.dropout(linear(self.c_proj, F.silu(gate) * up, decode))
        # GPT-2 uses the tanh approximation of GELU; matching it keeps HF logits within 1e-5
        return self.dropout(linear(self.c_proj, F.gelu(linear(self.c_fc, x, decode), approximate="tanh"), decode))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask, rope=None, cache=None, layer=0, cache_pos=0):
        x = x + self.attn(self.ln_1(x), mask, rope, cache, layer, cache_pos)
        decode = cache is not None and x.size(1) == 1  # one new token per row
        return x + self.mlp(self.ln_2(x), decode)


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
            # GPT-2 learns a table of absolute positions; the Llama family rotates q and k instead
            **({} if config.llama else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # GPT-2 and small Llamas/Qwens: one V x C matrix, not two
            self.lm_head.weight = self.transformer.wte.weight
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
        x = self.hidden(idx, position_ids, attention_mask, cache, cache_pos)
        return self.head(x, output_mask, decode=cache is not None and idx.size(1) == 1)

    def hidden(self, idx, position_ids=None, attention_mask=None, cache=None, cache_pos=0):
        """The trunk: embeddings -> blocks -> final norm. Arguments as in forward; returns the
        final hidden states (B, T, C). Shapes depend only on the inputs' shapes, so this part
        compiles to one graph."""
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
        x, rope = self.transformer.wte(idx), None
        if self.config.llama:
            rope = rotary(self.config, position_ids)  # computed once, used by every layer
        else:
            x = x + self.transformer.wpe(position_ids)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, rope, cache, i, cache_pos)  # (B, T, C)
        return self.transformer.ln_f(x)

    def head(self, x, output_mask=None, decode=False):
        """Logits from hidden states x (B, T, C): (N, V) at the output_mask positions (in
        row-major order), else (B, T, V). decode: x holds one new position per row."""
        if output_mask is not None:
            x = x[output_mask]  # (N, C): the LM head runs only where it is needed
        # decoding: (W @ x^T)^T, see `linear` (GPT-2, 32 rows, 2 threads: ~30 ms instead of
        # ~38 ms, a tenth of the whole step); the logits come back as a transposed view
        return linear(self.lm_head, x, decode and output_mask is None)  # (B, T, V) or (N, V)

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, device or p.device, dtype or p.dtype)

    # ---- bookkeeping -----------------------------------------------------------------

    def num_params(self, non_embedding=False):
        """Parameter count (tied weights once). non_embedding drops the embedding tables (token,
        positions if any, and an untied output head), as the scaling-law papers count them."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            n -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
            n -= 0 if self.config.tie_embeddings else self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len, training=True):
        """Approximate FLOPs per token: 2 per matmul weight per token forward (the
        non-embedding parameters, whatever their shapes: narrower K/V projections under GQA,
        SwiGLU's three matrices, plus the LM head) and attention's 2 * 2 * L * T * (n_head *
        head_dim) for QK^T and AV (every query head attends, shared K/V or not); backward is
        twice the forward (PaLM, appendix B)."""
        cfg = self.config
        n = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.n_embd
        fwd = 2 * n + 4 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_dim
        return 3 * fwd if training else fwd
