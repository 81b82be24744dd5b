"""
sample.py -- a batched sampler with a preallocated KV cache, and a command line around it.

Online preference optimisation spends most of its time here: every SELM iteration decodes
a response for every prompt of its chunk. So the sampler is written for speed:
  - prompts of different lengths are left-padded into one batch; position ids count only
    real tokens, so a row's logits do not depend on how much padding it got;
  - one prefill over the whole batch, then one decode step per new token for the whole
    batch, each step writing one slot of a preallocated KV cache (no concatenation, no
    recomputation of the prefix);
  - the LM head runs only at the last position during prefill;
  - no Python loop over rows inside a step, and the only host-device sync is the check
    "has every row stopped?", made every few steps.

    python sample.py --ckpt out/selm_3.pt --prompt dcbagfe --num-samples 4
"""

import argparse
import os
import sys

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from model import positions_from_mask


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


def next_token(logits, temperature, top_k, top_p, generator):
    """(B, V) logits of the last position -> (B,) next tokens."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model, idx, attention_mask, cache):
    """Run the left-padded prompts (B, P) through the model, filling cache slots [0, P).
    Returns the logits of the last position only: (B, V)."""
    B, P = idx.shape
    last = torch.zeros(B, P, dtype=torch.bool, device=idx.device)
    last[:, -1] = True  # left padding puts every prompt's last token in the last column
    return model(idx, position_ids=positions_from_mask(attention_mask),
                 attention_mask=attention_mask, cache=cache, cache_pos=0, output_mask=last)


def decode_step(model, tokens, positions, attention_mask, cache, cache_pos):
    """One new token per row: tokens (B,), positions (B,) -> logits (B, V). attention_mask:
    (B, S) key-padding mask of slots [0, S = cache_pos + 1), or the (B, 1, 1, S) boolean mask."""
    logits = model(tokens[:, None], position_ids=positions[:, None],
                   attention_mask=attention_mask, cache=cache, cache_pos=cache_pos)
    return logits[:, -1]


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             eos_id=None, seed=None, pad_id=0, stop_check_every=4):
    """Sample continuations of a batch of prompts.

    prompts: list of B token-id lists, of different lengths (each non-empty).
    max_new_tokens: at most this many new tokens per row. A prompt that leaves no room in
        the model's context is an error; otherwise max_new_tokens is cut to what fits.
    temperature: 0 is greedy argmax; top_k / top_p filter the distribution first.
    eos_id: a row stops after emitting it; one id, or several (Tokenizer.eos_ids: a chat
        model may end its turn with either of two tokens). seed: a private torch.Generator,
        so the global RNG is neither used nor disturbed, and the same seed gives the same samples.
    Returns (responses, finished): per row the new tokens only, cut after the first EOS
    (the EOS itself included), and whether that row emitted EOS.
    """
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
    device = model.transformer.wte.weight.device
    B = len(prompts)
    eos_ids = set(eos_id) if isinstance(eos_id, (set, frozenset, list, tuple)) else \
        None if eos_id is None else {int(eos_id)}
    eos = None if eos_id is None else torch.tensor(sorted(eos_ids), device=device)

    idx = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros(B, P + max_new_tokens, dtype=torch.bool)  # key slots holding real tokens
    for i, p in enumerate(prompts):  # left padding: the prompt ends in the last column
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    mask[:, P:] = True  # every generated slot is real (finished rows write padding we ignore)
    idx, mask = idx.to(device), mask.to(device)
    pos = torch.tensor(lengths, device=device)  # position of each row's next token

    generator = None
    if seed is not None and temperature != 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    cache = model.new_cache(B, P + max_new_tokens)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    logits = prefill(model, idx, mask[:, :P], cache)
    # The decode step's attention mask, built once: the query of step t sits in slot P + t and
    # may see every real slot up to its own, i.e. mask[:, :P + t + 1] (its own slot is real).
    step_mask = mask[:, None, None, :]  # (B, 1, 1, P + max_new_tokens)
    for t in range(max_new_tokens):
        tok = next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            tok = tok.masked_fill(done, pad_id)  # a stopped row only writes padding
            done |= torch.isin(tok, eos)
        out[:, t] = tok
        n = t + 1
        if eos_id is not None and (t + 1) % stop_check_every == 0 and bool(done.all()):
            break  # the one host-device sync: every few steps, to know when to stop
        if t + 1 < max_new_tokens:
            logits = decode_step(model, tok, pos + t, step_mask[..., :P + t + 1], cache, P + t)
    model.train(was_training)

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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample from a selm checkpoint.")
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    ap.add_argument("--prompt", required=True, help="prompt text; the checkpoint's prompt template wraps it (built-in task: the letters to sort)")
    ap.add_argument("--num-samples", type=int, default=1, help="responses to draw")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="response length cap")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    args = ap.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        try:
            model = model_from_checkpoint(ckpt, args.ckpt).to(args.device)
        except (AssertionError, RuntimeError) as e:  # e.g. cuda on a PyTorch built without it
            raise ValueError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
        tok = checkpoint_tokenizer(ckpt, args.ckpt)
        # train.py stores how its prompts were formatted, e.g. "sort: {prompt}\n"
        ids = tok.encode_prompt(ckpt.get("prompt_template", "{prompt}").replace("{prompt}", args.prompt))
        responses, finished = generate(model, [ids] * args.num_samples, args.max_new_tokens,
                                       args.temperature, args.top_k, args.top_p,
                                       eos_id=tok.eos_ids, seed=args.seed, pad_id=tok.pad_id)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"sample.py: error: {e}")
    for r, f in zip(responses, finished):
        text = tok.decode([t for t in r if t not in tok.eos_ids])
        print(repr(text) + ("" if f else "  [no EOS: cut at --max-new-tokens]"))


def checkpoint_tokenizer(ckpt, path):
    """The tokenizer a checkpoint was trained with: its name and the directory it came from
    are stored in it. Another tokenizer would turn the prompt into ids the model never saw,
    and nothing would say so: a mismatch is an error."""
    # The tokenizer is tokenizer.py's business; the command line borrows it, the sampler
    # above does not need it.
    from tokenizer import get_tokenizer
    saved = ckpt.get("tokenizer") or {}  # absent (a hand-made checkpoint): the default tokenizer
    name, source = (saved, None) if isinstance(saved, str) else (saved.get("name"), saved.get("source"))
    if source is not None and not os.path.isdir(source):
        raise ValueError(f"checkpoint {path} was trained with the tokenizer in {source}, which is not there")
    tok = get_tokenizer(source, verbose=False)
    if (name is not None and tok.name != name) or tok.vocab_size > ckpt["model_config"]["vocab_size"]:
        raise ValueError(f"checkpoint {path} was trained with tokenizer {name!r} "
                         f"({source or 'built in, or tiktoken cache'}), but this machine gives {tok.name!r}")
    return tok

if __name__ == "__main__":
    main()
