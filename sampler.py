"""
sampler.py -- a batched sampler with a preallocated KV cache.

Online preference optimisation spends most of its time here: every SELM iteration decodes
a response for every prompt of its chunk. So the sampler is written for speed:
  - prompts of different lengths are left-padded into one batch; position ids count only
    real tokens, so a row's logits do not depend on how much padding it got;
  - one prefill over the whole batch, then one decode step per new token for the whole
    batch, each step writing one slot of a preallocated KV cache (no concatenation, no
    recomputation of the prefix);
  - the LM head runs only at the last position during prefill;
  - no Python loop over rows inside a step, and the only host-device sync is the check
    "has every row stopped?", made every few steps;
  - generate(compile=True) compiles the decode step, whose tensors then have the same shapes
    at every token, once per bucket of batch size and cache length (CUDA graphs on a GPU).
    On a CPU in fp32 it gains little (bench.py measures both); in bf16 it fuses the step's
    small operations (1.5x eager on SmolLM2) after a compile of about a minute.

Its command line is sample.py (`python sample.py --ckpt ...`). This file imports only the model.
"""

import math
import time
import types
import weakref

import torch

from model import KVCache, positions_from_mask


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top-k and outside the nucleus (top-p).

    logits: (B, V) float. top_k keeps the k largest (ties at the k-th value are kept too).
    top_p keeps the smallest set of most likely tokens whose probability reaches top_p:
    a token is dropped when the mass of the tokens strictly ahead of it already reaches
    top_p, so the most likely token always survives. Both may be combined (k first).
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # (B, V) mass strictly ahead of each token
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits, temperature, top_k, top_p, u=None):
    """(B, V) logits of the last position -> (B,) next tokens. temperature: one, or (B,) one
    per row; 0 is greedy. u: (B, 1) one fp32 uniform draw per row (`draws`; None: torch's RNG).

    Greedy is the first of the largest logits, as argmax, which max(-1) finds 2-4x faster on a
    CPU. Sampling inverts the cumulative distribution: the first token whose running sum of
    exp(logit - max) exceeds u times the row's total, an exact draw from softmax(logits / T),
    several times faster than torch.multinomial on a CPU (bench.py measures both). Filtering
    and the softmax are fp32 and the sums fp64 whatever the model's dtype, so that the smallest
    of 150k probabilities still count; u (at most 1 - 2^-24) times the total stays below the
    total, so right=True never picks a token of probability 0 (removed by top-k or top-p)."""
    rows = torch.is_tensor(temperature)
    if not rows and temperature == 0:
        return logits.max(-1).indices
    t = torch.where(temperature == 0, 1.0, temperature)[:, None] if rows else temperature  # x / 1 is x, bit for bit
    z = filter_logits(logits.float() / t, top_k, top_p)
    cdf = z.to(torch.float64, memory_format=torch.contiguous_format)  # (B, V), rows contiguous
    cdf.sub_(cdf.amax(-1, keepdim=True)).exp_().cumsum_(-1)  # in place: one (B, V) buffer
    u = torch.rand(cdf.size(0), 1, device=cdf.device) if u is None else u  # (B, 1) in [0, 1)
    tok = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True).squeeze(-1)
    tok = tok.clamp_(max=cdf.size(-1) - 1)  # only NaN logits reach past the end: keep ids valid, as argmax does
    return torch.where(temperature == 0, logits.max(-1).indices, tok) if rows else tok


def draws(generators, n_prompts, samples, device):
    """One uniform draw per row of a batch of n_prompts * samples rows, prompt i's answer j in
    row i * samples + j: (rows, 1) fp32. One generator draws them all in row order; one per
    answer (samples of them) draws answer j's rows in prompt order, which is what a batch of
    the n_prompts alone, sampled with generators[j], draws."""
    if len(generators) == 1:
        return torch.rand(n_prompts * samples, 1, generator=generators[0], device=device)
    return torch.cat([torch.rand(n_prompts, 1, generator=g, device=device) for g in generators], 1).view(-1, 1)


# ---- the decode step: fixed shapes ----------------------------------------------------------
#
# A decode step whose tensors have the same shapes at every token can be compiled once and
# replayed (torch.compile; on CUDA, CUDA graphs: one launch instead of hundreds). So the step
# never slices anything to the current length: the new keys and values are written at a
# tensor slot, attention reads the whole preallocated cache, and a boolean mask hides the
# slots not yet written. The step's inputs all live in one StaticCache.

class StaticCache(KVCache):
    """What the decode step reads and writes, all of fixed shape: the KV cache (one
    (B, n_kv_head, max_len, head_dim) tensor per layer), and
      mask   (B, max_len) bool, True where a slot holds a real token;
      pos    (B,) each row's position of its next token (padding does not count);
      slot   (1,) the cache slot of the next token, the same for every row."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        super().__init__(config, batch_size, max_len, device, dtype)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def tensors(self):
        return [*self.k, *self.v, self.mask, self.pos, self.slot]

    def compact(self, keep):
        """Keep the rows `keep` (B,) bool of the batch: finished rows stop costing compute (eager)."""
        self.k, self.v = [k[keep] for k in self.k], [v[keep] for v in self.v]
        self.mask, self.pos = self.mask[keep], self.pos[keep]


def prefill(model, idx, attention_mask, cache, rows=None):
    """Run the left-padded prompts idx (B, P) through the model, filling cache slots [0, P),
    and set the cache up for decoding at slot P. Returns the logits of the last position
    only: (B, V). (Shapes change with P here: the prefill runs once per call, eager.)
    rows: (R,) the prompt of each of the cache's R rows, when they are not the B prompts one
    to one: k answers to one prompt share its prefill, whose keys and values are computed once
    and copied to its k rows. The logits are then (R, V), one per cache row."""
    B, P = idx.shape
    last = torch.zeros(B, P, dtype=torch.bool, device=idx.device)
    last[:, -1] = True  # left padding puts every prompt's last token in the last column
    once = cache if rows is None else KVCache(model.config, B, P, idx.device, cache.k[0].dtype)
    logits = model(idx, position_ids=positions_from_mask(attention_mask),
                   attention_mask=attention_mask, cache=once, cache_pos=0, output_mask=last)
    if rows is not None:  # every row of the cache gets its prompt's keys, values, logits, mask
        for whole, part in zip(cache.k + cache.v, once.k + once.v):
            whole[:, :, :P] = part[rows]
        logits, attention_mask = logits[rows], attention_mask[rows]
    cache.mask.zero_()  # slots of an earlier call (a compiled step's cache is reused) are stale
    cache.mask[:, :P] = attention_mask
    cache.pos.copy_(attention_mask.sum(1))
    cache.slot.fill_(P)
    return logits


def decode_step(model, tokens, cache, n_slots=None):
    """One new token per row, tokens (B,), at cache.slot -> logits (B, V). The cache's slot and
    positions advance by one.
    n_slots None: attention reads the whole cache and the slot is a tensor, so every tensor has
    the same shape at every step (compiled). n_slots, the slots written so far with this
    one (eager): attention reads those only, and the slot is n_slots - 1 (on a CPU, where
    reading the cache's spare slots costs time and nothing is compiled)."""
    slot = cache.slot if n_slots is None else n_slots - 1
    cache.mask.index_fill_(1, cache.slot, True)  # the new token sees itself, and is seen later
    logits = model(tokens[:, None], position_ids=cache.pos[:, None],
                   attention_mask=cache.mask[:, None, None, :n_slots], cache=cache, cache_pos=slot)
    cache.pos += 1
    cache.slot += 1
    return logits[:, -1]


def reads_whole_cache(device, dtype):
    """Whether an eager decode step should read every slot of the cache, the unwritten ones
    masked, rather than the slots written so far: on a CPU in bf16 (fp16), whose batched matmul
    copies the view of the written slots (rows not contiguous) where reading them all costs less
    (SmolLM2's attention at batch 64, 100 of 130 slots written: 0.40 ms instead of 0.76 ms a
    layer). fp32's matmul reads the view as it is: there the written slots alone are cheaper."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def bucket(n, smallest=64):
    """n rounded up to 64, 96, 128, 192, 256, 384, ...: two sizes per octave. A compiled step
    is specialised to its batch size and cache length, and compiling takes seconds: a few
    sizes mean few graphs, reused across calls, while a short request pays at most 1.5x
    (a 1.33x-wide bucket above 96) for the slots it does not need."""
    b = smallest
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


# Compiled decode steps, per model and per (batch, cache length, dtype, device): each with the
# StaticCache it runs on, kept for the next call (CUDA graphs replay on fixed addresses).
# Weights are read at every call, never frozen: a training step's in-place update is seen.
_COMPILED = weakref.WeakKeyDictionary()
_COMPILE_SECONDS = weakref.WeakKeyDictionary()  # per model: seconds its buckets' first steps took


def compile_seconds(model):
    """Seconds spent so far compiling the decode steps of `model` (the first step of each new
    bucket): time that whoever times sampling counts apart from it (runtime.Runtime.sample)."""
    return _COMPILE_SECONDS.get(model, 0.0)


def compiled_decode_step(model, batch_size, max_len, dtype, device):
    """(the decode step compiled for this bucket, its cache, whether it is new). On CUDA mode
    "reduce-overhead" records it as a CUDA graph; on a CPU, the default mode."""
    steps = _COMPILED.setdefault(model, {})
    key = (batch_size, max_len, dtype, device)
    new = key not in steps
    if new:
        cache = StaticCache(model.config, batch_size, max_len, device, dtype)
        for t in cache.tensors():  # CUDA graphs write to these in place: fixed addresses
            torch._dynamo.mark_static_address(t)
        mode = "reduce-overhead" if device.type == "cuda" else None
        # fullgraph: one graph or an error (a graph break would split the CUDA graph). Dynamo
        # counts a function's graphs against a limit (8), then silently runs it eager: each
        # bucket compiles its own copy of the step, so buckets never use up each other's.
        step = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__,
                                  "decode_step", decode_step.__defaults__)
        step = torch.compile(step, mode=mode, dynamic=False, fullgraph=True)
        steps[key] = (_new_cuda_graph_step(step) if device.type == "cuda" else step), cache
    return (*steps[key], new)


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    """Settings that would sample nonsense without a word are errors: a negative temperature
    inverts the distribution, top_k 0 or top_p 0 removes every token."""
    for problem, bad in {f"max_new_tokens must be at least 1, got {max_new_tokens}": max_new_tokens < 1,
                         f"temperature must be 0 (greedy) or positive and finite, got {temperature}":
                             not 0 <= temperature < math.inf,
                         f"top_k must be at least 1, got {top_k}": top_k is not None and top_k < 1,
                         f"top_p must be in (0, 1], got {top_p}": top_p is not None and not 0 < top_p <= 1}.items():
        if bad:
            raise ValueError(problem)


# Sampling copies, per model and dtype, kept for compiled sampling (weakref: they go with the model)
_CASTS = weakref.WeakKeyDictionary()


def in_dtype(model, dtype, keep=False):
    """The model to sample with in `dtype` (None: its own): itself when its weights already are,
    else a copy in eval mode with every weight cast once, for as long as the call. That is what
    makes bf16 sampling pay: autocast casts every weight at every step and keeps the activations
    between blocks fp32 (SmolLM2-135M, 32 chat prompts, 48 tokens, 2 cores: 3.1 s with a bf16
    copy, 5.5 s under autocast, 6.3 s in fp32). keep: the copy of an earlier call, refreshed in
    place (a compiled decode step is specialised to the module it runs)."""
    if dtype is None or model.transformer.wte.weight.dtype == dtype:
        return model
    twin = _CASTS.setdefault(model, {}).get(dtype) if keep else None
    if twin is None:
        with torch.device("meta"):  # the structure only: no memory, no random initialisation
            twin = type(model)(model.config)
        twin.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                              for k, v in model.state_dict().items()}, assign=True)
        if model.config.tie_embeddings:  # assign gave the head a cast of its own: one matrix again
            twin.lm_head.weight = twin.transformer.wte.weight
        if keep:
            _CASTS[model][dtype] = twin
    else:
        with torch.no_grad():  # parameters() lists a tied matrix once, in both: the same order
            for mine, theirs in zip(twin.parameters(), model.parameters()):
                mine.copy_(theirs)
    return twin.eval()


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             eos_id=None, seed=None, pad_id=0, stop_check_every=4, compile=False, dtype=None, samples=1):
    """Sample continuations of a batch of prompts.

    prompts: list of B token-id lists, of different lengths (each non-empty).
    max_new_tokens: at most this many new tokens per row. A prompt that leaves no room in
        the model's context is an error; otherwise max_new_tokens is cut to what fits.
    temperature: 0 is greedy argmax; top_k / top_p filter the distribution first. One, or one
        per answer (a list of `samples`: a prompt's greedy answer and its samples in one batch).
    eos_id: a row stops after emitting it; one id, or several (Tokenizer.eos_ids: a chat
        model may end its turn with either of two tokens).
    samples: answers per prompt, B * samples rows, prompt i's answer j in row i * samples + j.
        Each prompt is run through the model once and its keys and values copied to its rows.
    seed: a private torch.Generator's seed (None: torch's global RNG, else untouched); or one
        per answer (a list of `samples`): answer j then draws what a call with seed[j] alone
        draws, so k answers sharing a prefill are those of k calls (up to float rounding).
    dtype: the dtype to compute in (None: the weights'), with the weights cast once (in_dtype)
        and the KV cache in it; filtering, the softmax and the draw stay fp32 (next_token).
    compile: decode with the step compiled (torch.compile; CUDA graphs on CUDA), once per
        bucket of batch size (a power of two) and cache length (see `bucket`); the first call
        of a bucket compiles it (seconds: compile_seconds), later calls reuse it. The same
        tokens as eager, and with the same seed the same samples.
    Eager, rows that have stopped leave the batch once a quarter of it has (seen at the check
    every stop_check_every steps), so that finished answers cost no more compute. The other
    rows compute and draw exactly what they would have; only float rounding, which can depend
    on the batch's size, may tip a near-tie another way (as compiling may).
    Returns (responses, finished): per row the new tokens only, cut after the first EOS
    (the EOS itself included), and whether that row emitted EOS.
    """
    seeds = list(seed) if isinstance(seed, (list, tuple)) else None
    temps = list(temperature) if isinstance(temperature, (list, tuple)) else None
    for t in temps or [temperature]:
        check_sampling(max_new_tokens, t, top_k, top_p)
    if samples < 1 or any(x is not None and len(x) != samples for x in (seeds, temps)):
        raise ValueError(f"generate: samples must be at least 1, and seed and temperature one or one per sample; "
                         f"got samples={samples}, seed={seed}, temperature={temperature}")
    if len(prompts) == 0:
        return [], []
    block = model.config.block_size
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    P = max(lengths)
    if P >= block:
        raise ValueError(f"prompt of {P} tokens leaves no room in the model's context of {block}")
    max_new_tokens = min(max_new_tokens, block - P)
    net = in_dtype(model, dtype, keep=compile)  # the weights to sample with
    device, dtype = net.transformer.wte.weight.device, net.transformer.wte.weight.dtype
    n_real = len(prompts) * samples
    B = 1 << (n_real - 1).bit_length() if compile else n_real  # compiled: a power of two, padding rows last
    # the prompt of every row of the batch (padding rows copy prompt 0 and are never read);
    # None: the prompts themselves, one row each
    src = torch.arange(len(prompts), device=device).repeat_interleave(samples)
    src = None if B == len(prompts) else torch.cat([src, src.new_zeros(B - n_real)])
    eos_ids = set(eos_id) if isinstance(eos_id, (set, frozenset, list, tuple)) else \
        None if eos_id is None else {int(eos_id)}
    eos = None if eos_id is None else torch.tensor(sorted(eos_ids), device=device)

    idx = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)  # key slots holding real tokens
    for i, p in enumerate(prompts):  # left padding: the prompt ends in the last column
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    idx, mask = idx.to(device), mask.to(device)

    # one generator (None: torch's global RNG), or one per answer; one temperature, or one per row
    generators = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds or [seed]]
    sampled = any(t != 0 for t in temps or [temperature])
    if temps is not None and len(set(temps)) > 1:
        temperature = torch.tensor(temps, device=device).repeat(len(prompts))  # row i * samples + j: temps[j]
    elif temps is not None:
        temperature = temps[0]

    was_training = net.training
    net.eval()
    first = False
    if compile:
        step, cache, first = compiled_decode_step(net, B, min(bucket(P + max_new_tokens), block), dtype, device)
    else:  # eager: exactly the slots this call needs
        step, cache = decode_step, StaticCache(net.config, B, P + max_new_tokens, device, dtype)
    whole = reads_whole_cache(device, dtype)
    out = torch.full((n_real, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(n_real, dtype=torch.bool, device=device)
    # The step's input: the real rows' new tokens, then padding for the padding rows. Only the
    # real rows are sampled, so that they draw the same random numbers as they would eager.
    tokens = torch.full((B,), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(n_real, device=device)  # the batch's rows still decoding, by original row
    n = 0
    logits = prefill(net, idx, mask, cache, src)
    for t in range(max_new_tokens):
        u = draws(generators, len(prompts), samples, device)[rows] if sampled else None
        tok = next_token(logits[:len(rows)], temperature[rows] if torch.is_tensor(temperature) else temperature,
                         top_k, top_p, u)
        if eos_id is not None:
            tok = tok.masked_fill(done[rows], pad_id)  # a stopped row only writes padding
            done[rows] |= torch.isin(tok, eos)
        out[rows, t] = tok
        n = t + 1
        if eos_id is not None and (t + 1) % stop_check_every == 0:  # the one host-device sync
            finished = int(done[rows].sum())
            if finished == len(rows):
                break  # every row has stopped
            if not compile and finished * 4 >= len(rows):  # eager: a quarter done, drop them
                keep = ~done[rows]
                rows, tok = rows[keep], tok[keep]
                cache.compact(keep)
                tokens = tokens[keep]
        if t + 1 < max_new_tokens:
            tokens[:len(rows)] = tok  # compiled: the padding rows after them keep their padding
            if compile:
                t0 = time.perf_counter()
                logits = step(net, tokens, cache)  # every slot of the bucket: a fixed shape
                if first:  # compiling happens in a new bucket's first step: timed apart
                    _sync(device)
                    _COMPILE_SECONDS[model] = compile_seconds(model) + time.perf_counter() - t0
                    first = False
            else:  # eager: attention reads the P + t + 1 slots written so far, or all (whole)
                logits = step(net, tokens, cache, None if whole else P + t + 1)
    net.train(was_training)

    out = out[:, :n].tolist()
    responses, finished = [], []
    for row in out:
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None) if eos_ids else None
        if stop is not None:
            row = row[:stop + 1]
            finished.append(True)
        else:
            finished.append(False)
        responses.append(row)
    return responses, finished


def _new_cuda_graph_step(step):
    def run(*args):
        # a new step: the CUDA graph may overwrite the last step's outputs (already consumed)
        torch.compiler.cudagraph_mark_step_begin()
        return step(*args)
    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
