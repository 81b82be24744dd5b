"""Tests for selm.py: the losses by hand and by their optima, log-probs against a slow loop."""

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from model import GPT, preset  # noqa: E402
from selm import (CANDIDATES, Candidate, best_and_worst, candidates_of, check_hparams,  # noqa: E402
                  dpo_loss, optimism_term, pairs_from_scores, preference_metrics, relabel_counts,
                  reference_logps, selm_loss, sequence_logps, split_logps)

LOG2 = math.log(2)
f64 = torch.float64


# ---- 1. policy == reference ----------------------------------------------------------------

def test_policy_equal_to_reference_gives_log2_zero_rewards_zero_optimism():
    torch.manual_seed(0)
    chosen, rejected, y_ref = (-50 * torch.rand(8) for _ in range(3))
    for beta in (0.01, 0.1, 2.0):
        losses, cr, rr = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
        assert torch.equal(losses, torch.full_like(losses, LOG2))  # -log sigmoid(0), exactly
        assert torch.equal(cr, torch.zeros(8)) and torch.equal(rr, torch.zeros(8))
        opt = optimism_term(y_ref, y_ref.clone(), beta=beta, alpha=0.5)
        assert torch.equal(opt, torch.zeros(8))
        s_losses, _, _ = selm_loss(chosen, rejected, chosen.clone(), rejected.clone(), y_ref,
                                   y_ref.clone(), beta=beta, alpha=0.5)
        assert torch.equal(s_losses, torch.full_like(losses, LOG2))
        m = preference_metrics(losses, cr, rr, optimism=opt)
        assert m["loss"] == pytest.approx(LOG2) and m["rewards/accuracies"] == 0.0
        assert m["rewards/margins"] == 0.0 and m["optimism"] == 0.0


# ---- 2. hand-computed examples -----------------------------------------------------------

def test_hand_computed_sigmoid_ipo_selm():
    pc, pr, rc, rr_ = (torch.tensor([v]) for v in (-5.0, -7.0, -6.0, -6.0))
    beta = 0.5
    # h = (pc - pr) - (rc - rr) = (-5 + 7) - (-6 + 6) = 2;  beta * h = 1
    # sigmoid: -log sigmoid(1) = log(1 + e^-1) = 0.31326...
    losses, cr, rj = dpo_loss(pc, pr, rc, rr_, beta=beta)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert cr.item() == pytest.approx(0.5 * (-5 + 6)) and rj.item() == pytest.approx(0.5 * (-7 + 6))
    # ipo: (h - 1/(2 beta))^2 = (2 - 1)^2 = 1
    losses, _, _ = dpo_loss(pc, pr, rc, rr_, beta=beta, loss_type="ipo")
    assert losses.item() == pytest.approx(1.0)
    # selm, alpha = 0.1, log pi(y_ref) = -4, log ref(y_ref) = -3:
    # optimism = 0.1 * 0.5 * (-4 + 3) = -0.05, added to the DPO loss
    losses, _, _ = selm_loss(pc, pr, rc, rr_, torch.tensor([-4.0]), torch.tensor([-3.0]),
                             beta=beta, alpha=0.1)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)) - 0.05, abs=1e-6)
    # selm + ipo: 1 - 0.05
    losses, _, _ = selm_loss(pc, pr, rc, rr_, torch.tensor([-4.0]), torch.tensor([-3.0]),
                             beta=beta, alpha=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx(0.95)


def test_metrics_by_hand():
    losses = torch.tensor([1.0, 3.0])
    cr, rr = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 1.0])
    m = preference_metrics(losses, cr, rr, policy_chosen_logps=torch.tensor([-2.0, -4.0]),
                           policy_rejected_logps=torch.tensor([-6.0, -8.0]),
                           optimism=torch.tensor([0.1, 0.3]))
    assert m == pytest.approx({"loss": 2.0, "rewards/chosen": -0.25, "rewards/rejected": 0.625,
                               "rewards/accuracies": 0.5, "rewards/margins": (0.25 - 2.0) / 2,
                               "rewards/saturated": 0.0,
                               "logps/chosen": -3.0, "logps/rejected": -7.0, "optimism": 0.2})
    assert all(type(v) is float for v in m.values())
    # saturated: sigmoid(-(r_w - r_l)) < 0.01, i.e. a margin above log(99) = 4.595
    sat = preference_metrics(losses, torch.tensor([4.6, 4.5]), torch.tensor([0.0, 0.0]))["rewards/saturated"]
    assert sat == 0.5


def test_alpha_zero_is_dpo_bitwise_including_gradients():
    torch.manual_seed(1)
    args = [(-30 * torch.rand(16)).requires_grad_() for _ in range(6)]
    for loss_type in ("sigmoid", "ipo"):
        d = dpo_loss(*args[:4], beta=0.1, loss_type=loss_type)
        s = selm_loss(*args, beta=0.1, alpha=0.0, loss_type=loss_type)
        for a, b in zip(d, s):
            assert torch.equal(a, b)
        gd = torch.autograd.grad(d[0].sum(), args[:4])
        gs = torch.autograd.grad(s[0].sum(), args[:4])
        assert all(torch.equal(a, b) for a, b in zip(gd, gs))


# ---- 3. tabular softmax policy: the optimism gradient and Eq. 4.3 -------------------------

def test_optimism_gradient_tabular_and_eq_4_3_identity():
    torch.manual_seed(2)
    K, alpha, beta = 6, 0.3, 0.7
    theta = torch.randn(K, dtype=f64, requires_grad=True)
    theta_ref = torch.randn(K, dtype=f64)
    pi = F.softmax(theta, 0).detach()
    pi_ref = F.softmax(theta_ref, 0)
    log_pi, log_ref = F.log_softmax(theta, 0), F.log_softmax(theta_ref, 0)

    # one y_ref: grad_theta [alpha beta log pi(y_ref)] = alpha beta (onehot(y_ref) - pi)
    for y in range(K):
        term = optimism_term(log_pi[y:y + 1], log_ref[y:y + 1], beta=beta, alpha=alpha)
        (g,) = torch.autograd.grad(term.sum(), theta, retain_graph=True)
        assert torch.allclose(g, alpha * beta * (F.one_hot(torch.tensor(y), K).to(f64) - pi),
                              atol=1e-14)

    # Eq. 4.3: E_{y~pi_ref}[grad log pi(y)] = E_{y~pi}[exp(-r(y)/beta) grad log pi(y)],
    # r = beta log(pi/pi_ref), because exp(-r/beta) = pi_ref/pi. Both sides by exact sums.
    # J[y] = grad_theta log pi(y), [K, K]
    J = torch.autograd.functional.jacobian(lambda t: F.log_softmax(t, 0), theta.detach())
    r = beta * (log_pi - log_ref).detach()
    lhs = pi_ref @ J
    rhs = (pi * torch.exp(-r / beta)) @ J
    assert torch.allclose(lhs, rhs, atol=1e-12)
    # and the code's term, in expectation over y_ref ~ pi_ref, has exactly that gradient
    expected_term = (pi_ref * optimism_term(log_pi, log_ref, beta=beta, alpha=alpha)).sum()
    (g,) = torch.autograd.grad(expected_term, theta)
    assert torch.allclose(g, alpha * beta * rhs, atol=1e-12)
    assert torch.allclose(g, alpha * beta * (pi_ref - pi), atol=1e-12)  # closed form


# ---- 4. two-armed bandit: the optima of the expected losses ------------------------------
#
# Arms 1, 2; pi = softmax(theta), d = theta_1 - theta_2 = log(pi_1/pi_2); pi_ref uniform;
# arm 1 beats arm 2 with probability p.
#
# DPO. With a uniform reference h = d when 1 beats 2 and h = -d otherwise, so
#   E L(d) = -p log s(beta d) - (1-p) log s(-beta d),      s = sigmoid.
# Using d/dz[-log s(z)] = s(z) - 1:
#   E L'(d) = -p beta (1 - s(beta d)) + (1-p) beta s(beta d) = beta (s(beta d) - p),
# zero at s(beta d) = p, i.e. d* = logit(p) / beta; E L'' = beta^2 s'(beta d) > 0: the minimum.
#
# SELM adds alpha beta E_{y_ref ~ pi_ref}[log pi(y_ref) - log pi_ref(y_ref)]
#   = alpha beta * 0.5 (log s(d) + log s(-d)) + const    (log pi_1 = log s(d), log pi_2 = log s(-d))
# Its derivative: alpha beta * 0.5 ((1 - s(d)) - s(d)) = alpha beta * 0.5 (1 - 2 s(d))
#   = -(alpha beta / 2) tanh(d/2)                           (2 s(d) - 1 = tanh(d/2)).
# Setting beta (s(beta d) - p) - (alpha beta / 2) tanh(d/2) = 0 and dividing by beta:
#   s(beta d) - p = (alpha / 2) tanh(d / 2)                 -- the stated root equation holds.
# The optimism part is concave in d (it rewards moving pi away from uniform), so the root is a
# unique minimum only when g(d) = s(beta d) - p - (alpha/2) tanh(d/2) is increasing,
# g'(d) = beta s'(beta d) - (alpha/4) sech^2(d/2) > 0 (at d = 0: alpha < beta), and the loss
# is bounded below only when alpha < 2 min(p, 1-p) (g(+inf) = 1 - p - alpha/2 > 0,
# g(-inf) = -p + alpha/2 < 0). Since tanh(d/2) has the sign of d, the SELM optimum lies
# further from 0 than DPO's: on this bandit optimism sharpens the policy.
#
# IPO (a bonus check): E L = p (d - c)^2 + (1-p) (-d - c)^2, c = 1/(2 beta);
# E L' = 2 (d - c (2p - 1)) = 0 at d* = (2p - 1) / (2 beta), finite even at p = 1.

def _sig(z):
    return 1 / (1 + math.exp(-z))


def _bandit_optimum(p, beta, alpha, loss_type="sigmoid"):
    """argmin over tabular logits of the exact expected loss, using selm.py's losses."""
    theta = torch.zeros(2, dtype=f64, requires_grad=True)
    log_ref = torch.full((2,), math.log(0.5), dtype=f64)
    # four examples (winner, loser, y_ref) with their probabilities: the expectation is exact
    win, lose = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0])
    yr = torch.tensor([0, 1, 0, 1])
    prob = torch.tensor([p / 2, p / 2, (1 - p) / 2, (1 - p) / 2], dtype=f64)

    def expected_loss():
        lp = F.log_softmax(theta, 0)
        if alpha is None:
            losses, _, _ = dpo_loss(lp[win], lp[lose], log_ref[win], log_ref[lose], beta=beta,
                                    loss_type=loss_type)
        else:
            losses, _, _ = selm_loss(lp[win], lp[lose], log_ref[win], log_ref[lose], lp[yr],
                                     log_ref[yr], beta=beta, alpha=alpha, loss_type=loss_type)
        return (prob * losses).sum()

    opt = torch.optim.LBFGS([theta], lr=1, max_iter=100, tolerance_grad=1e-13,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_loss()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return (theta[0] - theta[1]).item()


def _selm_root(p, beta, alpha):
    g = lambda d: _sig(beta * d) - p - alpha / 2 * math.tanh(d / 2)  # noqa: E731
    # a unique root: g increasing everywhere (checked on a wide grid) with a sign change
    # g'(d) = (beta/4) sech^2(beta d/2) - (alpha/4) sech^2(d/2), using s'(z) = sech^2(z/2)/4
    # (stable in the tails, where 1 - s(z) rounds to 0)
    dg = lambda d: (beta / math.cosh(beta * d / 2) ** 2 - alpha / math.cosh(d / 2) ** 2) / 4  # noqa
    assert alpha < 2 * min(p, 1 - p) and all(dg(-100 + 0.01 * i) > 0 for i in range(20001))
    lo, hi = -100.0, 100.0
    assert g(lo) < 0 < g(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("p,beta,alpha", [(0.7, 0.5, 0.2), (0.8, 1.0, 0.3), (0.6, 0.2, 0.1),
                                          (0.3, 0.5, 0.2)])
def test_bandit_optima(p, beta, alpha):
    d_dpo = _bandit_optimum(p, beta, None)
    assert abs(d_dpo - math.log(p / (1 - p)) / beta) < 1e-3
    assert abs(_bandit_optimum(p, beta, 0.0) - d_dpo) < 1e-9  # alpha = 0: the same problem
    d_selm_star = _selm_root(p, beta, alpha)
    d_selm = _bandit_optimum(p, beta, alpha)
    assert abs(d_selm - d_selm_star) < 1e-3
    assert abs(d_selm_star) > abs(d_dpo) + 1e-2  # optimism sharpens, away from uniform
    assert abs(_bandit_optimum(p, beta, None, "ipo") - (2 * p - 1) / (2 * beta)) < 1e-3


# ---- 5. sequence log-probs ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    model = GPT(preset("tiny", vocab_size=61)).eval()
    # GPT-2's init gives near-uniform logits, under which position or context errors would
    # hardly show; larger random weights make every token's log-prob depend on both
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


ROWS = [([1, 5, 9], [7, 3, 3, 8, 2]), ([4], [6, 2]), ([11, 12, 13, 14, 15, 16], [1]),
        ([2, 3], []), ([9, 9, 9, 9], [20, 21, 22])]


def _batch(rows, left=False, pad=0):
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    rmask = torch.zeros(len(rows), T, dtype=torch.long)
    amask = torch.zeros_like(rmask)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        s = T - n if left else 0
        ids[i, s:s + n] = torch.tensor(p + r)
        rmask[i, s + len(p):s + n] = 1
        amask[i, s:s + n] = 1
    return ids, rmask, amask


def _slow_logps(model, prompt, response):
    """The definition, one prefix at a time: sum_t log pi(y_t | x, y_<t)."""
    ids, total = prompt + response, 0.0
    with torch.no_grad():
        for i, tok in enumerate(response):
            logits = model(torch.tensor([ids[:len(prompt) + i]]))[0, -1]
            total += F.log_softmax(logits.double(), -1)[tok].item()
    return total


def test_sequence_logps_matches_slow_loop_and_padding_side(tiny):
    slow = torch.tensor([_slow_logps(tiny, p, r) for p, r in ROWS])
    with torch.no_grad():
        ids, rm, _ = _batch(ROWS)
        right = sequence_logps(tiny, ids, rm)
        ids_l, rm_l, am_l = _batch(ROWS, left=True)
        left = sequence_logps(tiny, ids_l, rm_l, attention_mask=am_l)
        # negative control: left padding WITHOUT corrected positions must differ
        wrong = sequence_logps(tiny, ids_l, rm_l, attention_mask=am_l,
                               position_ids=torch.arange(ids_l.shape[1]).expand_as(ids_l))
        # a right-padded batch may also pass its attention mask
        right_am = sequence_logps(tiny, ids, rm, attention_mask=_batch(ROWS)[2])
    assert right.dtype == torch.float32 and right.shape == (len(ROWS),)
    assert torch.allclose(right, slow.float(), atol=1e-4, rtol=0)
    assert torch.allclose(left, right, atol=1e-4, rtol=0)
    assert torch.allclose(right_am, right, atol=1e-4, rtol=0)
    assert (wrong - right).abs().max() > 0.1
    assert right[3] == 0.0  # an empty response scores exactly 0: prompt tokens never count


def test_sequence_logps_independent_of_batch_mates_and_pad_ids(tiny):
    with torch.no_grad():
        full = sequence_logps(tiny, *_batch(ROWS)[:2])
        for i, row in enumerate(ROWS):
            alone = sequence_logps(tiny, *_batch([row])[:2])
            assert torch.allclose(alone[0], full[i], atol=1e-4, rtol=0)
        perm = [4, 2, 0, 3, 1]
        shuffled = sequence_logps(tiny, *_batch([ROWS[i] for i in perm])[:2])
        assert torch.allclose(shuffled, full[perm], atol=1e-4, rtol=0)
        # pad ids after the real tokens are never seen by them
        assert torch.equal(sequence_logps(tiny, *_batch(ROWS, pad=42)[:2]), full)
        ids_l, rm_l, am_l = _batch(ROWS, left=True, pad=0)
        ids_l2 = _batch(ROWS, left=True, pad=42)[0]
        assert torch.allclose(sequence_logps(tiny, ids_l2, rm_l, attention_mask=am_l),
                              sequence_logps(tiny, ids_l, rm_l, attention_mask=am_l), atol=1e-5)


def test_sequence_logps_counts_only_masked_tokens(tiny):
    ids, rm, _ = _batch(ROWS)
    heads = []
    hook = tiny.lm_head.register_forward_hook(lambda m, inp, out: heads.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            base = sequence_logps(tiny, ids, rm)
            # the head ran only at positions that predict a response token
            assert heads == [int(rm[:, 1:].sum())]
            # all-zero response mask: every row exactly 0
            none = sequence_logps(tiny, ids, torch.zeros_like(rm))
            assert torch.equal(none, torch.zeros(len(ROWS)))
            # marking one more token (the last prompt token of row 0) adds exactly its log-prob
            rm2 = rm.clone()
            rm2[0, 2] = 1
            extra = sequence_logps(tiny, ids, rm2) - base
        expected = _slow_logps(tiny, [1, 5], [9])
        assert extra[0].item() == pytest.approx(expected, abs=1e-4)
        assert torch.equal(extra[1:], torch.zeros(len(ROWS) - 1))
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="position 0"):
        sequence_logps(tiny, ids, torch.ones_like(rm))


def test_sequence_logps_bf16_model_returns_fp32(tiny):
    ids, rm, _ = _batch(ROWS)
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    with torch.no_grad():
        out = sequence_logps(model, ids, rm)
        ref = sequence_logps(tiny, ids, rm)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.5, rtol=0.05)


def test_split_logps():
    a, b, c = split_logps(torch.arange(6.0), 3)
    assert a.tolist() == [0, 1] and b.tolist() == [2, 3] and c.tolist() == [4, 5]
    with pytest.raises(ValueError):
        split_logps(torch.arange(5.0), 3)


# ---- 6. gradients flow through the policy terms only ---------------------------------------

def test_gradient_reaches_policy_only(tiny):
    chosen = [(p, r) for p, r in ROWS if r]
    rejected = [(p, r[::-1] + [30]) for p, r in chosen]
    y_ref = [(p, [40, 41]) for p, _ in chosen]
    B = len(chosen)
    ids, rm, _ = _batch(chosen + rejected + y_ref)  # one forward for all three
    policy = copy.deepcopy(tiny).train()
    ref_model = copy.deepcopy(tiny).train()

    ref = reference_logps(ref_model, [{"input_ids": ids[:B], "response_mask": rm[:B]},
                                      {"input_ids": ids[B:], "response_mask": rm[B:]}])
    assert not ref.requires_grad and ref.shape == (3 * B,)
    assert ref_model.training  # mode restored
    pol = sequence_logps(policy, ids, rm)
    # reference == policy here (same weights, dropout 0): the step-0 loss is log 2
    assert torch.allclose(pol.detach(), ref, atol=1e-5, rtol=0)
    (pc, pr, py), (rc, rr, ry) = split_logps(pol, 3), split_logps(ref, 3)
    losses, cr, rj = selm_loss(pc, pr, rc, rr, py, ry, beta=0.1, alpha=0.5)
    assert torch.allclose(losses, torch.full_like(losses, LOG2), atol=1e-5)
    assert not cr.requires_grad and not rj.requires_grad
    losses.mean().backward()
    assert all(p.grad is None for p in ref_model.parameters())
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0

    # reference inputs that did require grad would get none from the rewards
    rc2 = rc.clone().requires_grad_()
    _, cr2, _ = dpo_loss(pc.detach(), pr.detach(), rc2, rr, beta=0.1)
    assert not cr2.requires_grad


# ---- 7. errors ---------------------------------------------------------------------------

def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="alpha"):
        check_hparams(beta=0.1, alpha=-1e-3)
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            check_hparams(beta=beta, alpha=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        check_hparams(beta=0.1, alpha=0.1, loss_type="hinge")
    check_hparams(beta=0.1, alpha=0.0, loss_type="ipo")  # valid: no error


def test_selm_loss_returns_its_optimism_term():
    torch.manual_seed(0)
    x = [torch.randn(4) for _ in range(6)]
    losses, cr, rr, opt = selm_loss(*x, beta=0.5, alpha=0.3, return_optimism=True)
    torch.testing.assert_close(opt, optimism_term(x[4], x[5], beta=0.5, alpha=0.3))
    dpo, _, _ = dpo_loss(*x[:4], beta=0.5)
    torch.testing.assert_close(losses, dpo + opt)


# ---- the judge step ------------------------------------------------------------------------

def test_best_and_worst_ties():
    assert best_and_worst([1.0, 3.0, 3.0, 1.0]) == (1, 3)  # earliest max, latest min
    assert best_and_worst([3.0, 3.0]) is None  # all equal: no preference
    assert best_and_worst([0.0, 2.0]) == (1, 0)


def answer(text, finished=True):
    """A Candidate named by its text, its ids the text's characters."""
    return Candidate(text, [ord(c) for c in text], finished=finished)


def cands(chosen, responses, rejected, order="offline-first"):
    """One prompt's Candidates: the offline pair's two answers and the policy's, named by their texts."""
    return candidates_of(answer(chosen), [answer(y) for y in responses], answer(rejected), order)


def texts(pair):
    return pair and (pair[0].text, pair[1].text)


def _scores(named, order="offline-first"):
    """A score list in CANDIDATES order from {"W": chosen, "R": y_ref, "L": rejected} scores."""
    return [named[c.text] for c in cands("W", ["R"], "L", order)]


def test_a_candidate_is_built_once_with_its_text_ids_and_source():
    """The candidates the judge reads and the pairs training reads are the same objects: text and
    ids together, whatever the order puts where."""
    class Tok:
        eos_ids = {0}

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

        def encode_response(self, text):
            return [ord(c) for c in text] + ([0] if getattr(text, "finished", True) else [])
    tok = Tok()
    assert Candidate.of_ids([104, 105, 0], tok) == Candidate("hi", [104, 105, 0], "", True)
    assert Candidate.of_ids([104, 105], tok) == Candidate("hi", [104, 105], "", False)  # no EOS: cut off
    assert Candidate.of_text("ok", tok).ids == [111, 107, 0]
    for order in CANDIDATES:
        cs = candidates_of(Candidate.of_text("W", tok), [Candidate.of_ids([82, 0], tok)], Candidate.of_text("L", tok),
                           order)
        assert [c.source for c in cs] == list(CANDIDATES[order])
        assert [c.text for c in cs] == [{"chosen": "W", "y_ref": "R", "rejected": "L"}[c.source] for c in cs]
        (w, l), = pairs_from_scores([[{"W": 1, "R": 2, "L": 0}[c.text] for c in cs]], [cs], order=order)
        assert (w.text, w.ids, w.source, l.text, l.ids) == ("R", [82, 0], "y_ref", "L", [76, 0])


@pytest.mark.parametrize("scores,pair", [
    ({"W": 2, "L": 0, "R": 5}, ("R", "L")),   # y_ref best: replaces chosen
    ({"W": 2, "L": 0, "R": -1}, ("W", "R")),  # y_ref worst: replaces rejected
    ({"W": 2, "L": 0, "R": 1}, ("W", "L")),   # y_ref in between: the offline pair
    ({"W": 0, "L": 2, "R": 1}, ("L", "W")),   # the judge overturns the offline label
    ({"W": 2, "L": 0, "R": 2}, ("W", "L")),   # ties go to the offline labels ...
    ({"W": 2, "L": 0, "R": 0}, ("W", "L")),
    ({"W": 1, "L": 1, "R": 3}, ("R", "L")),   # ... y_ref displaces only when strictly
    ({"W": 1, "L": 1, "R": 0}, ("W", "R")),   # better / worse
    ({"W": 1, "L": 1, "R": 1}, None),         # no preference at all
])
def test_pairs_from_scores(scores, pair):
    assert CANDIDATES["offline-first"] == ("chosen", "y_ref", "rejected")
    assert [texts(p) for p in pairs_from_scores([_scores(scores)], [cands("W", ["R"], "L")])] == [pair]


def test_pairs_from_scores_keep_ties_and_lengths():
    s = [[1, 1, 1], [0, 1, 2]]
    both = [cands("W", ["R"], "L"), cands("A", ["R"], "B")]
    assert [texts(p) for p in pairs_from_scores(s, both, keep_ties=True)] == [("W", "L"), ("B", "A")]
    with pytest.raises(ValueError, match="lengths"):
        pairs_from_scores(s[:1], both)
    with pytest.raises(ValueError, match="scores"):
        pairs_from_scores([[1.0, 2.0]], both[:1])


@pytest.mark.parametrize("scores,offline_first,authors", [
    ({"W": 2, "L": 0, "R": 2}, ("W", "L"), ("R", "L")),   # a tie for best: the order's first
    ({"W": 2, "L": 0, "R": 0}, ("W", "L"), ("W", "R")),   # a tie for worst: latest vs first
    ({"W": 1, "L": 1, "R": 0}, ("W", "R"), ("W", "R")),
    ({"W": 1, "L": 1, "R": 3}, ("R", "L"), ("R", "W")),
])
def test_authors_order_breaks_ties_the_other_way(scores, offline_first, authors):
    """The authors' script ranks [y_ref, chosen, rejected] and takes the first best and the
    first worst; the default puts the offline labels first and last."""
    for order, want in (("offline-first", offline_first), ("authors", authors)):
        got = pairs_from_scores([_scores(scores, order)], [cands("W", ["R"], "L", order)], order=order)
        assert [texts(p) for p in got] == [want], order


def test_several_policy_answers_join_the_pair():
    # [chosen, y_1, y_2, y_3, rejected]: y_2 is the best, y_3 the worst
    s, cs = [[0.5, 0.4, 0.9, 0.1, 0.2]], [cands("W", ["a", "b", "c"], "L")]
    assert [texts(p) for p in pairs_from_scores(s, cs)] == [("b", "c")]
    n = relabel_counts(s, cs)
    assert n == {"identical": 0, "tied": 0, "better": 1, "y_ref_chosen": 1}


def test_token_logprob_matches_log_softmax_and_gradcheck():
    from selm import TokenLogprob
    torch.manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    torch.testing.assert_close(TokenLogprob.apply(z, y), z.log_softmax(-1).gather(1, y[:, None]).squeeze(1))
    assert torch.autograd.gradcheck(lambda t: TokenLogprob.apply(t, y), (z,))


def test_relabel_counts_tell_identical_tied_and_better_apart():
    scores = [_scores({"W": 1, "R": 1, "L": 0}),   # y_ref is the offline chosen itself
              _scores({"W": 1, "R": 1, "L": 0}),   # another answer, same score
              _scores({"W": 1, "R": 2, "L": 0}),   # strictly better: becomes the chosen one
              _scores({"W": 1, "R": 0, "L": 0.5})]  # worse
    n = relabel_counts(scores, [cands("abc", [y], "L") for y in ("abc", "abd", "xyz", "q")])
    assert n == {"identical": 1, "tied": 1, "better": 1, "y_ref_chosen": 1}


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_shared_prompt_logps_equal_one_row_per_response(model_type):
    """collate_shared + shared_logps (each prompt run once, responses side by side with a block
    mask) give sequence_logps' numbers on the (prompt, response) rows, and the same gradients."""
    from data import Example, collate, collate_shared, preference_rows
    from model import GPT, preset
    from selm import shared_logps
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=50, model_type=model_type, block_size=128)).double()
    g = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(0, 50, (n,), generator=g).tolist()  # noqa: E731
    examples = [Example(draw(p), draw(c), draw(r), (draw(y),)) for p, c, r, y in
                [(5, 3, 7, 1), (1, 9, 2, 4), (12, 1, 1, 6)]]  # ragged, one-token prompt and responses
    rows = collate(preference_rows(examples), pad_id=0)
    plain = sequence_logps(model, rows["input_ids"], rows["response_mask"])
    plain.square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared = shared_logps(model, collate_shared(examples, pad_id=0), n_parts=3)
    shared.square().sum().backward()
    assert torch.allclose(shared, plain, atol=1e-10), (shared - plain).abs().max()
    for p, w in zip(model.parameters(), want):
        assert (p.grad - w).norm() <= 1e-6 * w.norm()  # not exact: Llama's RMSNorm computes in fp32 inside


def test_the_missing_eos_penalty_lowers_only_the_cut_off_answers():
    from selm import penalise_unfinished
    scores, finished = [[1.0, 0.5, 0.0], [0.25, 0.75]], [[False, True, True], [True, False]]
    assert penalise_unfinished(scores, finished, 1.0) == [[0.0, 0.5, 0.0], [0.25, -0.25]]
    assert penalise_unfinished(scores, finished, 0.0) is scores
