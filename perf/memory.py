"""
memory.py -- how big can I go? Bytes per rank of a SELM training run, from a model config.

    python -m perf.memory                       # docs/speed.md's table: four models, 1 and 8 GPUs of 80 GB
    python -m perf.memory --seq 2048 --micro 2  # another shape of batch

Per rank, while training (weights kept in fp32, computed under bf16 autocast, AdamW):
  weights      4 bytes per parameter      } divided by the number of ranks under FSDP;
  gradients    4 bytes per parameter      } DDP keeps all of them on every rank
  AdamW        8 bytes per parameter      }
  activations  what autograd saves for the backward pass, per token and layer: counted here by
               running one block of the config on PyTorch's "meta" device (shapes, no data) and
               summing the tensors it saves; halved for bf16 autocast. With activation
               checkpointing only each block's input is kept, plus one block's worth while it
               is recomputed.
  LM head      the logits at the response tokens and their gradient, in fp32: the largest
               single tensors, 2 x (response tokens) x V x 4 bytes
Gradients exist only from the backward pass to the optimizer step (they are freed before each
step's forward), while the activations and logits are freed as the backward pass goes, so the
peak of a step in steady state is about
    weights + AdamW + max(activations + LM head, gradients).
For sampling, under FSDP, a gathered copy of the weights (4 bytes per parameter) exists
instead. The reference needs no copy: its log-probs are computed before the first update.
"""

import argparse
import math

import torch

from commands import one_line_errors
from model import GPT, GPTConfig
from runtime import check_device

GB = 1e9
# The models people align, by their published configs (vocabulary, width, depth, heads, MLP).
MODELS = {
    "Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, n_embd=896, n_layer=24, n_head=14, n_kv_head=2,
                         n_inner=4864, qkv_bias=True, tie_embeddings=True),
    "Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, n_embd=2048, n_layer=16, n_head=32, n_kv_head=8,
                         n_inner=8192, tie_embeddings=True),
    "Qwen2.5-7B": dict(model_type="qwen2", vocab_size=152064, n_embd=3584, n_layer=28, n_head=28, n_kv_head=4,
                       n_inner=18944, qkv_bias=True, tie_embeddings=False),
    "Llama-3-8B": dict(model_type="llama", vocab_size=128256, n_embd=4096, n_layer=32, n_head=32, n_kv_head=8,
                       n_inner=14336, tie_embeddings=False),
}


def param_count(config):
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def saved_bytes_per_token_layer(config, T=64):
    """Bytes autograd saves for one block's backward, per token, in fp32: one block of the
    config run forward on the meta device; weights (and views of them) are not counted."""
    one = GPTConfig(**{**config.__dict__, "n_layer": 1, "block_size": max(T, 64)})
    with torch.device("meta"):
        model = GPT(one)
    seen, total = set(), [0]

    def pack(t):
        base = t._base if t._base is not None else t
        if not (base.is_leaf and base.requires_grad) and id(base) not in seen:
            seen.add(id(base))
            total[0] += t.numel() * t.element_size()
        return t
    x = model.transformer.wte(torch.zeros(1, T, dtype=torch.long, device="meta")).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden(torch.zeros(1, T, dtype=torch.long, device="meta"))
    del x
    return total[0] / T


def plan(config, *, ranks, fsdp, checkpointing, micro_pairs=4, seq=1024, response=512, act_bytes=0.5):
    """Bytes per rank, by part. micro_pairs preference pairs per forward, each three sequences
    (chosen, rejected, y_ref) of `seq` tokens, `response` of them scored. act_bytes: the
    activations' size relative to fp32 (0.5 under bf16 autocast)."""
    n = param_count(config)
    share = ranks if fsdp else 1
    tokens, scored = 3 * micro_pairs * seq, 3 * micro_pairs * response
    per_layer = saved_bytes_per_token_layer(config) * act_bytes
    if checkpointing:  # each block's input kept, one block recomputed at a time
        acts = tokens * (config.n_layer * config.n_embd * 4 * act_bytes + per_layer)
    else:
        acts = tokens * config.n_layer * per_layer
    parts = {"weights": 4 * n / share, "gradients": 4 * n / share, "adamw": 8 * n / share,
             "activations": acts, "lm_head": 2 * scored * config.vocab_size * 4}
    # the gradients fill in as the backward pass frees the activations: the peak is the larger
    parts["total"] = (parts["weights"] + parts["adamw"]
                      + max(parts["activations"] + parts["lm_head"], parts["gradients"]))
    parts["sampling_copy"] = 4 * n if fsdp else 0
    return n, parts


def command(name, ranks, fsdp, checkpointing, seq):
    launch = "python" if ranks == 1 else f"torchrun --nproc_per_node {ranks}"
    flags = (" --fsdp" if fsdp else "") + (" --activation-checkpointing" if checkpointing else "")
    return (f"{launch} train.py --init-from {name}/ --block-size {seq} --batch-size 128 --micro-batch-size 4"
            f"{flags} --sft-steps 0 --prefs prefs.jsonl --prompts eval.jsonl --judge judge.py:judge")


def measure(config, device, checkpointing, micro_pairs=4, seq=1024, response=512):
    """The peak memory of SELM training steps, measured: a random-weight model of `config` on
    one device, two steps (the first creates AdamW's state), under bf16 autocast on a GPU.
    Returns (measured bytes, planned bytes) for the second step, weights included."""
    from runtime import Ranks, Runtime
    from selm import selm_loss, sequence_logps, split_logps
    torch.manual_seed(0)
    with device:  # built where it runs: initialising 0.5B parameters on a CPU first takes long
        model = GPT(config)
    Runtime(device, None, Ranks(), None, checkpointing=checkpointing).prepare(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    ids = torch.randint(0, config.vocab_size, (3 * micro_pairs, seq), device=device)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, seq - response:] = True
    ref = torch.zeros(3, micro_pairs, device=device)
    cuda = device.type == "cuda"
    for step in range(2):
        if step == 1 and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pc, pr, py = split_logps(sequence_logps(model, ids, resp), 3)
            losses, _, _ = selm_loss(pc, pr, ref[0], ref[1], py, ref[2], beta=0.1, alpha=1e-3)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if cuda else float("nan")
    planned = plan(config, ranks=1, fsdp=False, checkpointing=checkpointing, micro_pairs=micro_pairs, seq=seq,
                   response=response, act_bytes=0.5 if cuda else 1.0)[1]["total"]
    return peak, planned


def parser():
    ap = argparse.ArgumentParser(prog="python -m perf.memory",
                                 description="Bytes per rank of SELM training, from model configs.")
    ap.add_argument("--measure", default=None, help=f"one of {', '.join(MODELS)}: measure its training peak on "
                                                     "--device (random weights) against the plan")
    ap.add_argument("--device", default="cuda", help="for --measure")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (prompt + response)")
    ap.add_argument("--response", type=int, default=512, help="response tokens per sequence")
    ap.add_argument("--micro", type=int, default=4, help="preference pairs per forward (--micro-batch-size)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU")
    return ap


def check_args(args):
    """Every flag checked, in one line naming it, before anything runs."""
    if args.measure is not None and args.measure not in MODELS:
        raise ValueError(f"--measure {args.measure}: not one of {', '.join(MODELS)}")
    if not 0 < args.response < args.seq:
        raise ValueError(f"need 0 < --response < --seq, got --response {args.response} and --seq {args.seq}")
    if args.micro < 1:
        raise ValueError(f"--micro must be at least 1, got {args.micro}")
    if not 0 < args.gpu_gb < math.inf:
        raise ValueError(f"--gpu-gb must be positive and finite, got {args.gpu_gb}")
    if args.measure:
        check_device(args.device)


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        plan_or_measure(args)


def plan_or_measure(args):
    """--measure's peak against the plan, or the plan of every model as a markdown table."""
    if args.measure:
        config = GPTConfig(block_size=args.seq, **MODELS[args.measure])
        for ckpt in (False, True):
            peak, planned = measure(config, torch.device(args.device), ckpt, args.micro, args.seq, args.response)
            print(f"{args.measure}, 1 device, activation checkpointing {'on' if ckpt else 'off'}: "
                  f"measured {peak / GB:.1f} GB, planned {planned / GB:.1f} GB")
        return
    print(f"| model | params | GPUs | sharding | activation checkpointing | weights+grads+AdamW | activations | "
          f"LM head | total per GPU | fits {args.gpu_gb:g} GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, kw in MODELS.items():
        config = GPTConfig(block_size=args.seq, **kw)
        for ranks, fsdp in ((1, False), (8, False), (8, True)):
            for ckpt in (False, True):
                n, p = plan(config, ranks=ranks, fsdp=fsdp, checkpointing=ckpt, micro_pairs=args.micro, seq=args.seq,
                            response=args.response)
                static = p["weights"] + p["gradients"] + p["adamw"]
                print(f"| {name} | {n / 1e9:.2f}B | {ranks} | {'FSDP' if fsdp else 'DDP'} | "
                      f"{'on' if ckpt else 'off'} | "
                      f"{static / GB:.1f} GB | {p['activations'] / GB:.1f} GB | {p['lm_head'] / GB:.1f} GB | "
                      f"{p['total'] / GB:.1f} GB | {'yes' if p['total'] < 0.9 * args.gpu_gb * GB else 'no'} |")


if __name__ == "__main__":
    main()
