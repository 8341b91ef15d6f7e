"""The rest of the loss family against values derived by hand with plain floats and ``math``.

The same three hand-picked pairs as ``test_losses.py`` (h = 2, -3, -1.75); each expected number is
the paper's formula on Python floats, never the function under test. Row 0 of most losses is also
worked out to ten digits in a comment.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import (
    LOSSES,
    TRL_ALIASES,
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco,
    canonical,
    check_settings,
    cpo,
    discopop,
    dpo,
    dpo_norm,
    dpop,
    exo,
    f_scores,
    hinge,
    ipo,
    nca,
    preference_loss,
    rdpo,
    robust,
    sft,
    sppo,
)
from test_losses import ROWS, close, h_of, log_sigmoid, pairs, sigmoid


def ratios(row: tuple) -> tuple[float, float]:
    pc, pr, rc, rr, _, _ = row
    return pc - rc, pr - rr


def test_every_trl_loss_type_is_a_name_of_the_same_function() -> None:
    trl_types = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                 "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
    for name in trl_types:
        assert name in LOSSES, name
        assert LOSSES[name] is LOSSES[canonical(name)]
    assert canonical("sigmoid") == "dpo" and canonical("dpo") == "dpo" and set(TRL_ALIASES) <= set(trl_types)


@pytest.mark.parametrize("beta, eps", [(0.1, 1e-3), (0.5, 0.2)])
def test_exo_is_the_kl_of_eq16(beta: float, eps: float) -> None:
    expected = []
    for r in ROWS:
        qw, ql = sigmoid(beta * h_of(r)), sigmoid(-beta * h_of(r))
        expected.append(qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps))
    close(exo(*pairs(), beta=beta, label_smoothing=eps).losses, expected, 1e-10)
    with pytest.raises(ValueError, match="epsilon"):
        exo(*pairs(), label_smoothing=0.0)  # KL to a label of probability 0 is infinite


def test_exo_row0_by_hand() -> None:
    # beta h = 0.2: q_w = 0.5498339973, q_l = 0.4501660027, eps = 1e-3
    # 0.5498339973 * log(0.5498339973 / 0.999) + 0.4501660027 * log(0.4501660027 / 0.001) = -0.3282417 + 2.7490690
    out = exo(*pairs(ROWS[:1]), beta=0.1, label_smoothing=1e-3)
    assert out.losses.item() == pytest.approx(0.5498339973 * math.log(0.5498339973 / 0.999) + 0.4501660027 * math.log(450.1660027), rel=1e-9)


@pytest.mark.parametrize("beta, tau", [(0.1, 0.05), (0.5, 1.0)])
def test_discopop_is_eq5(beta: float, tau: float) -> None:
    expected = []
    for r in ROWS:
        z = beta * h_of(r)
        m = sigmoid(z / tau)
        expected.append((1 - m) * -log_sigmoid(z) + m * math.exp(-z))
    close(discopop(*pairs(), beta=beta, discopop_tau=tau).losses, expected)
    # row 0, beta 0.1, tau 0.05: z = 0.2, m = sigmoid(4) = 0.9820137900; 0.01798621 * 0.5981388693 + 0.98201379 * e^-0.2 = 0.8147672
    assert discopop(*pairs(ROWS[:1]), beta=0.1).losses.item() == pytest.approx(0.0179862100 * 0.5981388693 + 0.9820137900 * 0.8187307531, rel=1e-8)


def test_dpo_norm_divides_each_log_ratio_by_its_length() -> None:
    beta = 0.5
    expected = [-log_sigmoid(beta * (ratios(r)[0] / r[4] - ratios(r)[1] / r[5])) for r in ROWS]
    close(dpo_norm(*pairs(), beta=beta).losses, expected)
    # row 0: (1/4 - (-1)/5) = 0.45, -log sigmoid(0.225) = 0.5863...
    assert dpo_norm(*pairs(ROWS[:1]), beta=beta).losses.item() == pytest.approx(math.log1p(math.exp(-0.225)), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_the_sided_losses_are_their_papers_formulas(beta: float) -> None:
    rw = [beta * ratios(r)[0] for r in ROWS]
    rl = [beta * ratios(r)[1] for r in ROWS]
    close(nca(*pairs(), beta=beta).losses, [-log_sigmoid(w) - 0.5 * log_sigmoid(-w) - 0.5 * log_sigmoid(-lo) for w, lo in zip(rw, rl)])
    close(bco(*pairs(), beta=beta).losses, [-log_sigmoid(w) - log_sigmoid(-lo) for w, lo in zip(rw, rl)])
    close(sppo(*pairs(), beta=beta).losses, [(w / beta - 0.5 / beta) ** 2 + (lo / beta + 0.5 / beta) ** 2 for w, lo in zip(rw, rl)], 1e-10)
    close(apo_zero(*pairs(), beta=beta).losses, [1 - sigmoid(w) + sigmoid(lo) for w, lo in zip(rw, rl)])
    close(apo_down(*pairs(), beta=beta).losses, [sigmoid(w) + 1 - sigmoid(w - lo) for w, lo in zip(rw, rl)])
    for fn in (nca, bco, sppo, apo_zero, apo_down):
        out = fn(*pairs(), beta=beta)
        close(out.chosen_rewards, rw)
        close(out.rejected_rewards, rl)


def test_sided_row0_by_hand() -> None:
    # row 0, beta 0.1: r_w = 0.1, r_l = -0.1
    # sppo: (1 - 5)^2 + (-1 + 5)^2 = 32; bco: 2 log(1 + e^-0.1) = 2 * 0.6443966600 = 1.2887933200
    assert sppo(*pairs(ROWS[:1]), beta=0.1).losses.item() == pytest.approx(32.0)
    assert bco(*pairs(ROWS[:1]), beta=0.1).losses.item() == pytest.approx(1.2887933200, rel=1e-9)
    # apo_zero: 1 - sigmoid(0.1) + sigmoid(-0.1) = 2 sigmoid(-0.1) = 0.9500416250
    assert apo_zero(*pairs(ROWS[:1]), beta=0.1).losses.item() == pytest.approx(0.9500416250, rel=1e-9)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_aot_sorts_margins_across_the_batch(eps: float) -> None:
    beta = 0.5
    # paired: policy margins pc - pr = [2.5, -5, 1.75] -> sorted [-5, 1.75, 2.5]; reference margins rc - rr = [0.5, -2, 3.5]
    # -> sorted [-2, 0.5, 3.5]; deltas [-3, 1.25, -1]
    deltas = [-3.0, 1.25, -1.0]
    smoothed = [-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d) for d in deltas]
    close(aot(*pairs(), beta=beta, label_smoothing=eps).losses, smoothed)
    # unpaired: chosen ratios [1, -2, -0.25] -> [-2, -0.25, 1]; rejected ratios [-1, 1, 1.5] -> [-1, 1, 1.5]; deltas [-1, -1.25, -0.5]
    deltas = [-1.0, -1.25, -0.5]
    smoothed = [-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d) for d in deltas]
    close(aot_unpaired(*pairs(), beta=beta, label_smoothing=eps).losses, smoothed)


def test_sft_is_the_chosen_token_mean_over_the_batch() -> None:
    policy, _ = pairs()
    # chosen log-probs -10, -20, -7.25 over 4 + 8 + 2 tokens: 37.25 / 14
    out = sft(policy, None)
    assert out.losses.mean().item() == pytest.approx(37.25 / 14, rel=1e-12)
    close(out.losses, [10 * 3 / 14, 20 * 3 / 14, 7.25 * 3 / 14])


@pytest.mark.parametrize("beta, lam", [(0.1, 50.0), (0.5, 2.0), (0.5, 0.0)])
def test_dpop_is_eq3(beta: float, lam: float) -> None:
    expected = []
    for r in ROWS:
        penalty = max(0.0, -(r[0] - r[2]))  # max(0, log ref(yw) - log pi(yw))
        expected.append(-log_sigmoid(beta * (h_of(r) - lam * penalty)))
    out = dpop(*pairs(), beta=beta, dpop_lambda=lam)
    close(out.losses, expected)
    close(out.metrics["dpop_penalty"], [0.0, 2.0, 0.25])
    if lam == 0.0:
        close(out.losses, dpo(*pairs(), beta=beta).losses.tolist())
    # row 1 by hand, beta 0.1, lambda 50: h = -3, penalty 2: -log sigmoid(0.1 (-3 - 100)) = log(1 + e^10.3) = 10.3000337...
    if (beta, lam) == (0.1, 50.0):
        assert out.losses[1].item() == pytest.approx(10.3 + math.log1p(math.exp(-10.3)), rel=1e-12)


def test_dpop_gradient_pushes_up_a_chosen_likelihood_below_the_reference() -> None:
    policy, reference = pairs(ROWS[1:2], grad=True)  # chosen ratio -2: below the reference
    dpop(policy, reference, beta=0.1, dpop_lambda=50.0).reduce().backward()
    plain, _ = pairs(ROWS[1:2], grad=True)
    dpo(plain, reference, beta=0.1).reduce().backward()
    # dL/d chosen = -beta (1 + lambda) sigmoid(-z), z = beta (h - lambda penalty) = -10.3
    assert policy.chosen.grad.item() == pytest.approx(-0.1 * 51 * sigmoid(10.3), rel=1e-10)
    assert policy.chosen.grad.item() < 10 * plain.chosen.grad.item() < 0


@pytest.mark.parametrize("beta, alpha", [(0.1, 0.01), (0.5, 0.2), (0.5, 0.0)])
def test_rdpo_adds_the_length_gap_to_the_margin(beta: float, alpha: float) -> None:
    expected = [-log_sigmoid(beta * h_of(r) + alpha * (r[4] - r[5])) for r in ROWS]
    close(rdpo(*pairs(), beta=beta, rdpo_alpha=alpha).losses, expected)
    # row 1, beta 0.5, alpha 0.2: 0.5 * -3 + 0.2 * (8 - 3) = -0.5: -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740769842
    if (beta, alpha) == (0.5, 0.2):
        assert rdpo(*pairs(ROWS[1:2]), beta=beta, rdpo_alpha=alpha).losses.item() == pytest.approx(0.9740769842, rel=1e-9)


def test_f_divergence_scores_are_f_prime_of_the_ratio() -> None:
    u = torch.tensor([1.0, -2.0, -0.25], dtype=torch.float64)
    close(f_scores(u, "reverse_kl"), u.tolist())
    close(f_scores(u, "forward_kl"), [1 - math.exp(-x) for x in u.tolist()])
    close(f_scores(u, "js_divergence"), [math.log(2 * math.exp(x) / (math.exp(x) + 1)) for x in u.tolist()])
    close(f_scores(u, "alpha_divergence", 0.5), [(math.exp(-0.5 * x) - 1) / -0.5 for x in u.tolist()])
    close(f_scores(u, "alpha_divergence", 1.0), u.tolist())
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        f_scores(u, "kl")


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_dpo_replaces_each_log_ratio_by_its_score(f: str) -> None:
    def score(x: float) -> float:
        return {"forward_kl": 1 - math.exp(-x), "js_divergence": math.log(2) + log_sigmoid(x), "alpha_divergence": (math.exp(-0.7 * x) - 1) / -0.7}[f]
    beta, alpha = 0.5, 0.3
    hs = [score(ratios(r)[0]) - score(ratios(r)[1]) for r in ROWS]
    hp = {"f_divergence_type": f, "f_alpha_divergence_coef": alpha}
    close(dpo(*pairs(), beta=beta, **hp).losses, [-log_sigmoid(beta * h) for h in hs])
    close(hinge(*pairs(), beta=beta, **hp).losses, [max(0.0, 1 - beta * h) for h in hs])
    close(ipo(*pairs(), beta=beta, **hp).losses, [(h - 1 / (2 * beta)) ** 2 for h in hs], 1e-10)
    close(robust(*pairs(), beta=beta, label_smoothing=0.1, **hp).losses,
          [(-0.9 * log_sigmoid(beta * h) + 0.1 * log_sigmoid(-beta * h)) / 0.8 for h in hs])
    # the rewards stay DPO's implicit rewards
    close(dpo(*pairs(), beta=beta, **hp).chosen_rewards, [beta * ratios(r)[0] for r in ROWS])


def test_a_list_of_losses_is_the_weighted_sum_with_each_term_logged() -> None:
    beta = 0.1
    out = preference_loss(["sigmoid", "bco_pair", "sft"], *pairs(), weights=[0.8, 0.2, 1.0], beta=beta)
    dpo_terms = [-log_sigmoid(beta * h_of(r)) for r in ROWS]
    bco_terms = [-log_sigmoid(beta * ratios(r)[0]) - log_sigmoid(-beta * ratios(r)[1]) for r in ROWS]
    sft_terms = [10 * 3 / 14, 20 * 3 / 14, 7.25 * 3 / 14]
    close(out.losses, [0.8 * a + 0.2 * b + c for a, b, c in zip(dpo_terms, bco_terms, sft_terms)])
    close(out.metrics["loss/sigmoid"], dpo_terms)
    close(out.metrics["loss/bco_pair"], bco_terms)
    close(out.metrics["loss/sft"], sft_terms)
    close(out.chosen_rewards, [beta * ratios(r)[0] for r in ROWS])
    # each term reads only its own settings: label_smoothing goes to exo, not to nca
    both = preference_loss(["exo", "nca"], *pairs(), beta=beta, label_smoothing=0.01)
    close(both.losses, (exo(*pairs(), beta=beta, label_smoothing=0.01).losses + nca(*pairs(), beta=beta).losses).tolist())
    with pytest.raises(ValueError, match="gamma is not taken by loss dpo\\+nca"):
        preference_loss(["dpo", "nca"], *pairs(), gamma=0.5)
    with pytest.raises(ValueError, match="weights has 1 values for 2 losses"):
        preference_loss(["dpo", "nca"], *pairs(), weights=[1.0])


def test_check_settings_keeps_trls_f_divergence_rule() -> None:
    check_settings(["dpo", "sft"], f_divergence_type="js_divergence", beta=0.1)
    with pytest.raises(ValueError, match="only for the losses built on the reward difference .* not bco_pair"):
        check_settings(["dpo", "bco_pair"], f_divergence_type="js_divergence", beta=0.1)
    with pytest.raises(ValueError, match="exo needs 0 < label_smoothing"):
        check_settings("exo_pair", beta=0.1, label_smoothing=0.0)


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"kto"}))
def test_every_paired_loss_is_finite_and_differentiable_at_extreme_logps(name: str) -> None:
    chosen = torch.tensor([-5000.0, -4000.0, -1.0], requires_grad=True)
    rejected = torch.tensor([-100.0, -5000.0, -2.0], requires_grad=True)
    tokens = torch.tensor([1, 2, 1])
    reference = pairs()[1]._replace(chosen=torch.tensor([-10.0, -4000.0, -1.5]), rejected=torch.tensor([-100.0, -10.0, -2.0]),
                                    chosen_tokens=tokens, rejected_tokens=tokens)
    policy = reference._replace(chosen=chosen, rejected=rejected)
    hp = {"label_smoothing": 1e-3} if canonical(name) == "exo" else {}
    out = preference_loss(name, policy, reference, **hp)
    if canonical(name) == "discopop":  # its exponential term exp(-beta h) overflows at beta h = -499, in TRL's form too
        assert not torch.isfinite(out.losses[0])
        return
    out.reduce().backward()
    assert rejected.grad is None if canonical(name) == "sft" else torch.isfinite(rejected.grad).all(), name  # sft reads the chosen side only
    for value in (out.losses, chosen.grad):
        assert torch.isfinite(value).all(), (name, value)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2)])
def test_cpo_is_eq3_without_a_reference(beta: float, eps: float) -> None:
    policy, _ = pairs()
    margins = [r[0] - r[1] for r in ROWS]  # 2.5, -5, 1.75: the reference columns are never read
    close(cpo(policy, None, beta=beta, label_smoothing=eps).losses,
          [-(1 - eps) * log_sigmoid(beta * m) - eps * log_sigmoid(-beta * m) for m in margins])
    close(cpo(policy, None, beta=beta).chosen_rewards, [beta * r[0] for r in ROWS])
    # row 1 by hand, beta 0.1: -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740769842
    assert cpo(pairs(ROWS[1:2])[0], None, beta=0.1).losses.item() == pytest.approx(0.9740769842, rel=1e-9)
