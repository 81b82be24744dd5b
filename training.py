"""
training.py -- how a stage trains: SFT's steps of cross-entropy on the responses, one epoch of
the preference loss (DPO, or SELM when the examples carry the reference's own answers), and
what both share: AdamW, the learning-rate schedule, a guarded optimizer step, the running
figures the progress bar shows. train.py decides what each stage trains on; this chapter
trains it.
"""

import math

import torch
import torch.nn.functional as F

import data
from selm import dpo_loss, preference_metrics, selm_loss, shared_logps, split_logps


# ---- optimisation ---------------------------------------------------------------------------

def lr_at(step, total, peak, warmup):
    """Linear warmup over the first `warmup` fraction of steps, then cosine to zero."""
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def check_finite(loss, stage, step):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) in stage {stage} at step {step}; "
                                 "lower the learning rate (the last good checkpoint is intact)")


def adamw(params, rt, **kw):
    """torch's AdamW; under autocast on a CPU or GPU its fused kernel: one pass over each weight,
    its gradient and both moments instead of a dozen (SmolLM2-135M on 2 cores: 0.09 s a step
    instead of 0.44 s). The fused kernel rounds a few updates differently, so a fp32 run keeps
    the plain one and the numbers of earlier runs; the weights and moments stay fp32 either way."""
    return torch.optim.AdamW(params, fused=rt.dtype is not None and rt.device.type in ("cpu", "cuda") or None, **kw)


def optimizer_step(model, opt, grad_clip, stage, step):
    """Clip the gradient norm (when grad_clip > 0), refuse a non-finite one, then step."""
    if grad_clip:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn  # a DTensor under FSDP
        if not torch.isfinite(gn):
            raise FloatingPointError(f"non-finite gradient in stage {stage} at step {step}; "
                                     "lower the learning rate (the last good checkpoint is intact)")
    opt.step()


class Running:
    """What the training bar shows: each figure's exponential moving average over every step
    (the latest step weighs `1 - decay`), debiased so that the first steps count in full."""

    def __init__(self, decay=0.9):
        self.decay, self.steps, self.sums = decay, 0, {}

    def update(self, **figures):
        self.steps += 1
        for k, v in figures.items():
            self.sums[k] = self.decay * self.sums.get(k, 0.0) + (1 - self.decay) * v
        return {k: f"{v / (1 - self.decay ** self.steps):.3f}" for k, v in self.sums.items()}


# ---- stage 1: SFT -------------------------------------------------------------------------

def train_sft(rt, cfg, tok, model, examples, seed):
    """Cross-entropy on response tokens only (the prompt is given, not learned), averaged
    over the response tokens of the global batch; examples: (prompt_ids, response_ids). Under
    torchrun every rank draws the same global batch and takes its share; DDP averages
    gradients over ranks, so each rank scales its token sum by world / (global token count).
    seed: the batches' draw."""
    if not examples:  # --init-from weights and no --sft file: the stage keeps the weights
        return None
    W = rt.ranks.world
    fixed_len = max(len(p) + len(r) for p, r in examples)
    train_model = rt.wrap(model)
    optimizer = adamw(model.parameters(), rt, lr=cfg.sft_lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    g = torch.Generator().manual_seed(seed)
    bar, running = rt.bar(range(cfg.sft_steps), "sft"), Running()
    for step in bar:
        batch = [examples[i] for i in torch.randint(len(examples), (cfg.sft_batch_size,), generator=g).tolist()]
        n_tokens = sum(len(response) for _, response in batch)
        b = rt.to_device(data.collate(batch[rt.ranks.rank::W], tok.pad_id), fixed_len, tok.pad_id)
        target_mask = b["response_mask"][:, 1:]  # token t is predicted at position t-1
        with rt.autocast():
            logits = train_model(b["input_ids"][:, :-1], output_mask=target_mask)  # (N, V)
        loss = F.cross_entropy(logits.float(), b["input_ids"][:, 1:][target_mask], reduction="sum") * W / n_tokens
        check_finite(loss, "sft", step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.sft_steps, cfg.sft_lr, 0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(model, optimizer, cfg.grad_clip, "sft", step)
        total = sum(rt.ranks.gather([loss.item() / W]))
        bar.set_postfix(running.update(loss=total), refresh=False)  # every step; the log every log_every
        if step % cfg.log_every == 0 or step == cfg.sft_steps - 1:
            rt.log.write({"stage": "sft", "step": step, "loss": total, "lr": optimizer.param_groups[0]["lr"]})
    return optimizer


# ---- what offline DPO and SELM share: reference log-probs, one epoch of the loss ----------

def reference_logps_of(rt, cfg, tok, ref, examples, stage):
    """log pi_ref of every response of the Examples: (chosen, rejected, *y_refs), each (N,) on
    the device. The reference is the policy before its first update, so no second model copy
    is kept: these numbers are all the training epoch needs of it."""
    return rt.example_logps(ref, examples, tok.pad_id, cfg.micro_batch_size,
                            f"{stage}: reference log-probs").to(rt.device).unbind(0)


# what a preference step logs of each example: preference_metrics' arguments, in this order
STATS = ("losses", "chosen_rewards", "rejected_rewards", "policy_chosen_logps", "policy_rejected_logps", "optimism")


def preference_epoch(rt, cfg, tok, stage, policy, examples, ref_logps, lr, alpha, seed):
    """One epoch of the SELM loss (DPO when the Examples carry no y_ref) over `examples`,
    with the reference's log-probs given (reference_logps_of). Each optimizer step takes
    batch_size examples; under torchrun each rank takes its share, in micro-batches whose
    gradients are all-reduced only at the last one."""
    W, rank = rt.ranks.world, rt.ranks.rank
    n_parts = len(examples[0].responses())  # chosen, rejected and the m y_refs
    fixed_len = max(len(ex.prompt) + sum(map(len, ex.responses())) for ex in examples) if rt.compile else None
    train_model = rt.wrap(policy)
    optimizer = adamw(policy.parameters(), rt, lr=lr, weight_decay=cfg.weight_decay)
    # a batch too small to give every rank an example is dropped (only ever the last one)
    order = [b for b in data.batches(len(examples), cfg.batch_size, seed=seed) if len(b) >= W]
    policy.train()
    bar, running = rt.bar(order, stage), Running()
    for step, idx in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, len(order), lr, cfg.warmup)
        optimizer.zero_grad(set_to_none=True)
        mine = idx[rank::W]
        micro = [mine[m:m + cfg.micro_batch_size] for m in range(0, len(mine), cfg.micro_batch_size)]
        stats = []
        for k, mi in enumerate(micro):
            b = rt.to_device(data.collate_shared([examples[i] for i in mi], tok.pad_id, fixed_len))
            with rt.accumulate(train_model, sync=k == len(micro) - 1), rt.autocast():
                # every response of the micro-batch in one forward, each prompt run once, split
                # back into (B,) parts
                logps = shared_logps(train_model, b, n_parts)  # (n_parts * B,)
                pol_w, pol_l, *pol_y = split_logps(logps, n_parts)
                ref_w, ref_l, *ref_y = (part[mi] for part in ref_logps)
                if pol_y:  # SELM, Eq. 4.2; E_{y ~ pi_ref} estimated by the mean over the m y_refs
                    losses, chosen_r, rejected_r, optimism = selm_loss(
                        pol_w, pol_l, ref_w, ref_l, torch.stack(pol_y).mean(0), torch.stack(ref_y).mean(0),
                        beta=cfg.beta, alpha=alpha, loss_type=cfg.loss_type, return_optimism=True)
                else:  # offline DPO: no reference response, no optimism term
                    losses, chosen_r, rejected_r = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta=cfg.beta,
                                                            loss_type=cfg.loss_type)
                    optimism = torch.zeros_like(chosen_r)
                # a sum over examples / the global batch size: the gradient is the batch mean
                # whatever the micro-batch size, and DDP's average over ranks is undone by W
                loss = losses.sum() * W / len(idx)
                check_finite(loss, stage, step)
                loss.backward()
            stats.append(torch.stack([losses.detach(), chosen_r, rejected_r, pol_w.detach(), pol_l.detach(),
                                      optimism], 1))
        optimizer_step(policy, optimizer, cfg.grad_clip, stage, step)
        columns = torch.tensor(rt.ranks.gather(torch.cat(stats).cpu().tolist())).T  # (len(STATS), batch)
        row = preference_metrics(**dict(zip(STATS, columns)))
        bar.set_postfix(running.update(loss=row["loss"], acc=row["rewards/accuracies"]), refresh=False)
        if step % cfg.log_every == 0 or step == len(order) - 1:  # the bar shows every step, the log every log_every
            rt.log.write({"stage": stage, "step": step, "lr": optimizer.param_groups[0]["lr"], **row})
    return optimizer
