"""
selm.py -- the SELM objective and the small steps of its online loop.

SELM (Zhang et al. 2024, "Self-Exploring Language Models", arXiv 2405.19332) is DPO plus one
term. DPO fits the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) to preference
pairs; SELM adds an *optimism* bonus that, after the reparameterisation of Eq. 4.1, becomes
(Eq. 4.2)

    min_pi  L_DPO(pi)  +  alpha * beta * E_{x, y ~ pi_ref(.|x)} [ log pi(y|x) ],

i.e. it lowers the policy's likelihood of what the reference itself would say, which moves
probability mass toward responses the reference under-explores. Per example, exactly as the
authors' trainer computes it (log-probs SUMMED over response tokens):

    loss_i = -logsigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
             + alpha * beta * (log pi(y_ref) - log ref(y_ref))

The "- log ref(y_ref)" part is a constant: it shifts the reported loss, not the gradient.
With alpha = 0 SELM is iterative online DPO, and the code below makes that exact.

The chapter has four parts:
  1. log-probs of responses under a model        sequence_logps, split_logps, reference_logps
  2. the losses, as pure functions of log-probs  dpo_loss, optimism_term, selm_loss
  3. what to log                                 preference_metrics, win
  4. from judge scores to pairs                  Candidate, candidates_of, pairs_from_scores, relabel_counts

Shapes: B examples, T tokens, V vocabulary words. Batches are right-padded: input_ids [B, T]
long; response_mask [B, T] is 1 on the response tokens (final EOS included), 0 on the prompt
and on padding.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model import positions_from_mask

LOSS_TYPES = ("sigmoid", "ipo")


# ---- 1. log-probs ------------------------------------------------------------------------

def sequence_logps(model, input_ids, response_mask, attention_mask=None, position_ids=None):
    """Sum of log pi(token) over each row's response tokens.

    input_ids:      [B, T] long
    response_mask:  [B, T] 1 on response tokens (prompt and padding 0); position 0 must be 0
    attention_mask: [B, T] optional, 1 = real token. Needed for left-padded rows; with right
                    padding leave it None (pads come after every real token, so plain causal
                    attention never lets them touch a real one).
    position_ids:   [B, T] optional; derived from attention_mask when that is given, so that
                    left padding does not shift the learned absolute positions.
    Returns [B], float32 (float64 for a float64 model); differentiable w.r.t. the model.

    This is log pi(y|x) of DPO's Eq. 7 and of every SELM term: a sum, never a mean -- the
    authors' trainer sums, and averaging would change the loss's scale with response length.
    Chosen, rejected and y_ref responses should go through ONE call on their concatenation
    (see split_logps): one forward instead of three, and identical numerics for all three.
    """
    response_mask = response_mask.bool()
    if response_mask[:, 0].any():
        raise ValueError("response_mask marks position 0, which no earlier token predicts; "
                         "every response needs at least one prompt token (e.g. BOS) before it")
    B, T = input_ids.shape
    # Token t is predicted by the logits at position t-1. So the LM head runs at t-1 for each
    # response token t and nowhere else: the prompt, often most of a row, costs no V-wide
    # matmul, and no [B, T, V] tensor is ever built.
    scored = response_mask[:, 1:]                           # [B, T-1]: is token t (>= 1) scored?
    output_mask = torch.zeros_like(response_mask)
    output_mask[:, :-1] = scored                            # [B, T]: position t-1 <-> token t
    if attention_mask is not None and position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    logits = model(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                   output_mask=output_mask)                 # [N, V], row-major over (b, t-1)
    # Log-softmax in (at least) fp32 whatever the model's dtype: the policy and the reference
    # must share numerics, and a bf16 log-softmax over a large vocabulary loses whole nats.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:][scored]                      # [N], same row-major order
    token_logps = TokenLogprob.apply(logits, targets)       # [N]
    rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T - 1)[scored]  # [N]
    return token_logps.new_zeros(B).index_add(0, rows, token_logps)


class TokenLogprob(torch.autograd.Function):
    """log softmax(z_r)[y] = z_{r,y} - logsumexp(z_r) for logits z [M, V], targets y [N] and,
    optionally, the row r [N] of z that predicts each target (default: row n for target n;
    several targets may share a row: a prompt's last position predicts every response's first
    token, collate_shared).

    Autograd through gather and logsumexp would hold several [M, V] tensors at once in the
    backward pass; cross_entropy saves a whole [M, V] log-softmax. This saves only the logits
    (alive anyway) and the [M] logsumexp, and builds the gradient in one [M, V] buffer:
    d/dz_r = sum over the targets n of row r of g_n * (onehot(y_n) - softmax(z_r)).
    """

    @staticmethod
    def forward(ctx, logits, targets, rows=None):
        lse = torch.logsumexp(logits, dim=-1)                                   # [M]
        rows = torch.arange(len(targets), device=logits.device) if rows is None else rows
        ctx.save_for_backward(logits, targets, lse, rows)
        return logits[rows, targets] - lse[rows]                                # [N]

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse, rows = ctx.saved_tensors
        weight = torch.zeros_like(lse).index_add_(0, rows, grad_out.to(lse.dtype))   # [M]: sum of g per row
        grad = torch.sub(logits, lse[:, None]).exp_().mul_(-weight[:, None])  # -g * softmax
        grad.index_put_((rows, targets), grad_out.to(grad.dtype), accumulate=True)  # + g * onehot
        return grad, None, None


def shared_logps(model, batch, n_parts):
    """sequence_logps of a batch of data.collate_shared: every response of B examples, each
    prompt run once. Returns [n_parts * B] in the order of data.preference_rows (all chosen,
    all rejected, then each y_ref), which split_logps undoes, with the numbers sequence_logps
    gives the same (prompt, response) rows up to float rounding.

    The LM head runs once per position that predicts a scored token (a prompt's last position
    predicts the first token of every response), and each scored token reads its row."""
    ids, scored, pred = batch["input_ids"], batch["response_mask"].bool(), batch["predecessor"]
    B, T = ids.shape
    flat = torch.arange(B, device=ids.device)[:, None] * T                  # [B, 1]: where row b starts
    needed = (flat + pred)[scored]                                          # [N] flat positions that predict
    output_mask = torch.zeros(B * T, dtype=torch.bool, device=ids.device)
    output_mask[needed] = True
    logits = model(ids, position_ids=batch["position_ids"], attention_mask=batch["attention_mask"],
                   output_mask=output_mask.view(B, T))                      # [M, V], row-major
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # fp32 log-softmax, as above
    rows = (output_mask.long().cumsum(0) - 1)[needed]                       # [N]: the logits row of each
    token_logps = TokenLogprob.apply(logits, ids[scored], rows)            # [N]
    index = batch["part"][scored] * B + torch.arange(B, device=ids.device)[:, None].expand(B, T)[scored]
    return token_logps.new_zeros(n_parts * B).index_add(0, index, token_logps)


def split_logps(logps, n_parts):
    """Undo the concatenation of a combined forward: [n_parts * B] -> n_parts tensors of [B].

    The caller stacks the batch as [chosen; rejected; y_ref] (or [chosen; rejected] for DPO)
    along dim 0 and gets back (chosen_logps, rejected_logps, y_ref_logps).
    """
    if logps.shape[0] % n_parts:
        raise ValueError(f"cannot split {logps.shape[0]} log-probs into {n_parts} equal parts")
    return logps.view(n_parts, -1).unbind(0)


@torch.no_grad()
def reference_logps(model, batches, n_parts=None):
    """Log-probs of every row of `batches` under the reference, once per iteration.

    batches: iterable of dicts with "input_ids" and "response_mask" [B_k, T_k], optional
             "attention_mask" and "position_ids" (as sequence_logps takes them); or, with
             n_parts, batches of data.collate_shared (shared_logps).
    Returns [sum_k B_k] on the model's device, batch after batch in order (with n_parts:
    [n_parts, sum_k B_k], each example's responses in its column); requires_grad False.

    SELM's reference is the previous iterate (pi_ref = pi_{t-1}), i.e. the policy itself at
    the start of iteration t. So the caller can score the whole chunk with the policy before
    its first update and keep no second model in memory. The model runs in eval mode (no
    dropout) under no_grad; its train/eval mode is restored afterwards.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        out = []
        for b in batches:
            get = lambda key: None if b.get(key) is None else b[key].to(device)  # noqa: E731
            if n_parts:
                out.append(shared_logps(model, {k: get(k) for k in b}, n_parts).view(n_parts, -1))
            else:
                out.append(sequence_logps(model, get("input_ids"), get("response_mask"),
                                          get("attention_mask"), get("position_ids")))
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(*([n_parts] if n_parts else []), 0, device=device)
    return torch.cat(out, dim=-1)


# ---- 2. losses ---------------------------------------------------------------------------

def check_hparams(beta, alpha=0.0, loss_type="sigmoid"):
    """Raise ValueError for settings the losses below are not defined for. Called once, when
    a run starts: the losses themselves are pure arithmetic and check nothing."""
    # comparisons rather than `x <= 0` so that NaN is rejected too; infinity is no setting
    if not 0 < beta < math.inf:
        raise ValueError(f"beta must be positive and finite, got {beta}")
    if not 0 <= alpha < math.inf:
        raise ValueError(f"alpha must be non-negative and finite, got {alpha} (a negative alpha would "
                         "reward the reference's own responses: the opposite of exploring)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta, loss_type="sigmoid"):
    """The DPO loss per example (DPO paper Eq. 7; IPO paper Eq. 17 for loss_type="ipo").

    policy_chosen_logps:   [B] log pi(y_w|x), summed over response tokens
    policy_rejected_logps: [B] log pi(y_l|x)
    ref_chosen_logps:      [B] log pi_ref(y_w|x), no grad needed
    ref_rejected_logps:    [B] log pi_ref(y_l|x)
    beta:                  > 0, the KL strength; the implicit reward is beta * log(pi/pi_ref)
    loss_type:             "sigmoid" (DPO) or "ipo"
    Returns (losses, chosen_rewards, rejected_rewards), each [B]; the rewards are detached.
    """
    # h = log [pi(y_w) pi_ref(y_l) / (pi(y_l) pi_ref(y_w))]: r(y_w) - r(y_l) in units of beta.
    # Group policy with policy and reference with reference, as the DPO reference code does;
    # when policy == reference the two ratios are bitwise equal and h is exactly 0.
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    h = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        # Bradley-Terry likelihood of the observed preference: -log sigmoid(r_w - r_l)
        losses = -F.logsigmoid(beta * h)
    else:
        # IPO regresses h onto a finite target 1/(2 beta) instead of pushing it to infinity,
        # so deterministic preferences cannot drive pi(y_l) to zero
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def optimism_term(policy_ref_response_logps, ref_ref_response_logps, *, beta, alpha):
    """SELM's optimism term per example: alpha * beta * (log pi(y_ref) - log pi_ref(y_ref)).

    policy_ref_response_logps: [B] log pi(y_ref|x), y_ref a greedy sample of pi_ref
    ref_ref_response_logps:    [B] log pi_ref(y_ref|x): a constant, kept so that the term is
                               0 when pi == pi_ref and the reported loss matches the code's
    Returns [B]. One sample y_ref ~ pi_ref per prompt estimates E_{y~pi_ref}[log pi(y|x)] of
    Eq. 4.2. Its gradient is alpha*beta*E_{y~pi}[exp(-r(x,y)/beta) grad log pi(y|x)] (Eq. 4.3,
    since exp(-r/beta) = pi_ref/pi): minimising it pushes down hardest on the responses the
    policy already under-rewards. The paper's Algorithm 1 writes this term without beta; Eq. 4.2
    and the authors' code multiply by beta, and so do we.
    """
    return alpha * beta * (policy_ref_response_logps - ref_ref_response_logps)


def selm_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              policy_ref_response_logps, ref_ref_response_logps, *, beta, alpha,
              loss_type="sigmoid", return_optimism=False):
    """The SELM loss per example (Eq. 4.2 as the authors' code computes it): DPO + optimism.

    The first four arguments and beta, loss_type: as dpo_loss. The next two: as optimism_term.
    alpha: >= 0, the optimism strength (the authors: 1e-3 for Zephyr, 1e-4 for Llama-3).
    Returns (losses, chosen_rewards, rejected_rewards), each [B], and with return_optimism=True
    a fourth, the optimism term per example (detached), for logging. The rewards are DPO's:
    the optimism term is not a reward.
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type)
    # With alpha = 0 this adds exact zeros (0 * finite = 0, x + 0 = x), so losses and their
    # gradients equal DPO's bit for bit: SELM with alpha = 0 is iterative online DPO.
    optimism = optimism_term(policy_ref_response_logps, ref_ref_response_logps, beta=beta, alpha=alpha)
    losses = losses + optimism
    if return_optimism:
        return losses, chosen_rewards, rejected_rewards, optimism.detach()
    return losses, chosen_rewards, rejected_rewards


# ---- 3. metrics --------------------------------------------------------------------------

def preference_metrics(losses, chosen_rewards, rejected_rewards, *, policy_chosen_logps=None,
                       policy_rejected_logps=None, optimism=None):
    """Batch means under TRL's names, as Python floats.

    losses, chosen_rewards, rejected_rewards: [B], as returned by dpo_loss / selm_loss
    policy_chosen_logps, policy_rejected_logps: [B] optional -> "logps/chosen", "logps/rejected"
    optimism: [B] optional, optimism_term's output -> "optimism"
    "rewards/accuracies" is the fraction of pairs with chosen reward > rejected reward (ties
    count as wrong, so it starts at 0 when policy == reference), "rewards/margins" the mean of
    chosen - rejected, and "rewards/saturated" the fraction of pairs whose DPO gradient has all
    but vanished: sigmoid(-(r_w - r_l)) < 0.01, the factor the DPO gradient carries, while the
    optimism term's gradient never shrinks. Watch "logps/chosen": DPO often lowers the chosen
    log-prob too.
    """
    margins = chosen_rewards - rejected_rewards
    named = {"loss": losses, "rewards/chosen": chosen_rewards,
             "rewards/rejected": rejected_rewards,
             "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
             "rewards/margins": margins, "rewards/saturated": (torch.sigmoid(-margins) < 0.01).float()}
    for key, value in (("logps/chosen", policy_chosen_logps),
                       ("logps/rejected", policy_rejected_logps), ("optimism", optimism)):
        if value is not None:
            named[key] = value
    # one stack and one .tolist(): a single device-to-host copy rather than one per metric
    means = torch.stack([v.detach().float().mean() for v in named.values()]).tolist()
    return dict(zip(named, means))


def win(score_a, score_b):
    """One comparison of a win rate (AlpacaEval's, against reference answers): 1 for a win,
    0.5 for a tie, 0 for a loss."""
    return 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0


# ---- 4. from judge scores to preference pairs --------------------------------------------

# Where the offline pair and the policy's own responses (y_ref, or several samples y_1..y_n)
# sit in the list the judge scores. With the tie rule that goes with it, an order is a prior:
#   "offline-first" (the default): [chosen, y_1..y_n, rejected]; the best is the earliest
#       maximum, the worst the latest minimum. A policy response displaces the offline chosen
#       only when the judge scores it strictly higher, the offline rejected only when lower.
#   "authors": [y_1..y_n, chosen, rejected]; the best is the earliest maximum and the worst
#       the earliest minimum, as the authors' script takes argmax and argmin of PairRM's
#       ranks. PairRM's scores are continuous, so ties never arose there; a discrete judge
#       meets them often, and then this order favours the policy's answer as chosen.
CANDIDATES = {"offline-first": ("chosen", "y_ref", "rejected"), "authors": ("y_ref", "chosen", "rejected")}


class Candidate(NamedTuple):
    """One answer the judge is shown, built once with all that follows from it: its text (what
    the judge reads), its token ids (what training reads: EOS last when the answer ended), its
    source ("chosen", "rejected": the offline pair's; "y_ref": the policy's own, candidates_of
    names it) and whether it ended (False: cut off at the token limit, no EOS)."""
    text: str
    ids: list
    source: str = ""
    finished: bool = True

    @classmethod
    def of_text(cls, text, tok):
        """An answer given as text (an offline one): its ids as tok encodes a response, with no
        EOS for an answer marked unfinished (a `finished` attribute of False)."""
        return cls(text, tok.encode_response(text), finished=getattr(text, "finished", True))

    @classmethod
    def of_ids(cls, ids, tok):
        """A model's answer as the sampler returns it (ids, cut after its EOS if it emitted one):
        its text without the EOS; without one it was cut off."""
        ended = bool(ids) and ids[-1] in tok.eos_ids
        return cls(tok.decode(ids[:-1] if ended else ids), ids, finished=ended)


def candidates_of(chosen, responses, rejected, order="offline-first"):
    """One prompt's candidates, as the judge is shown them: the offline chosen and rejected
    answers and the policy's `responses` (a list: y_ref, or n samples), each a Candidate, in
    `order`, each named by its source."""
    named = {"chosen": [chosen], "y_ref": list(responses), "rejected": [rejected]}
    return [c._replace(source=name) for name in CANDIDATES[order] for c in named[name]]


def best_and_worst(scores, order="offline-first"):
    """Indices (best, worst) of one prompt's candidate scores, or None when all are equal.

    scores: sequence of >= 2 floats, higher is better. Among equal scores the EARLIER
    candidate is the best; the worst is the LATER one ("offline-first") or the EARLIER one
    ("authors"). Equal best and worst scores carry no preference: None.
    """
    hi, lo = max(scores), min(scores)
    if hi == lo:
        return None
    best = scores.index(hi)                                 # earliest of the maxima
    if order == "authors":
        return best, scores.index(lo)                       # earliest of the minima
    return best, len(scores) - 1 - scores[::-1].index(lo)   # latest of the minima


def penalise_unfinished(scores, finished, penalty):
    """The judge's scores with `penalty` taken from every answer cut off at the token limit
    (TRL's missing_eos_penalty): with scores in [0, 1] and a penalty of 1, any finished answer
    ranks above any unfinished one, so the model is not taught to run out of room.

    scores:   per-prompt score lists
    finished: per-prompt bool lists, aligned with scores (False: no end-of-turn token)
    penalty:  >= 0; 0 returns the scores as they are
    """
    if not penalty:
        return scores
    return [[v - penalty * (not f) for v, f in zip(s, fs)] for s, fs in zip(scores, finished)]


def pairs_from_scores(scores, candidates, *, order="offline-first", keep_ties=False):
    """SELM's relabelling step (Algorithm 1): per prompt, the best and the worst of the
    candidates {chosen, the policy's responses, rejected} by the judge's scores become the
    new pair.

    scores:     list of per-prompt score lists, each aligned with the prompt's candidates
    candidates: list of per-prompt Candidate lists, each in candidates_of's `order`
    keep_ties:  what to return when all the scores are equal
    Returns a list aligned with the prompts: (chosen, rejected) Candidates, and for a full tie
    None (the candidates carry no preference; drop the example) or, with keep_ties=True, the
    offline pair. Whatever its rank, y_ref stays the example's reference response for the
    optimism term, so it may appear in the pair as well.
    """
    if len(scores) != len(candidates):
        raise ValueError(f"lengths differ: {len(scores)} score lists, {len(candidates)} candidate lists")
    pairs = []
    for s, cs in zip(scores, candidates):
        if len(s) != len(cs):
            raise ValueError(f"{len(s)} scores for {len(cs)} candidates")
        ranked = best_and_worst(list(s), order)
        if ranked is None:
            offline = {c.source: c for c in cs}
            pairs.append((offline["chosen"], offline["rejected"]) if keep_ties else None)
        else:
            pairs.append((cs[ranked[0]], cs[ranked[1]]))
    return pairs


def relabel_counts(scores, candidates, order="offline-first"):
    """How the policy's best response (y_ref, or the best of its samples) fared against the
    offline chosen one, over a chunk's prompts.

    scores: per-prompt score lists; candidates: per prompt, its Candidates (candidates_of, in
    `order`; equal texts are the same answer). Returns counts of prompts where the policy's
    best response was
      identical  -- the very same response as the offline chosen one;
      tied       -- a different response with the same score;
      better     -- scored strictly higher: the loop found better data than it was given;
    and "y_ref_chosen", the prompts whose new chosen response is one of the policy's.
    """
    out = {"identical": 0, "tied": 0, "better": 0, "y_ref_chosen": 0}
    for s, cs in zip(scores, candidates):
        w = next(i for i, c in enumerate(cs) if c.source == "chosen")
        own = [i for i, c in enumerate(cs) if c.source == "y_ref"]
        k = max(own, key=lambda j: (s[j], -j))  # the best-scored, the earliest among equals
        out["identical"] += cs[w].text == cs[k].text
        out["tied"] += cs[w].text != cs[k].text and s[k] == s[w]
        out["better"] += s[k] > s[w]
        ranked = best_and_worst(list(s), order)
        out["y_ref_chosen"] += ranked is not None and cs[ranked[0]].source == "y_ref"
    return out
