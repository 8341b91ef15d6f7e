"""The preference losses against values derived by hand with plain floats and ``math``.

Every expected number here is computed from the paper's formula on Python floats, never by
calling the function under test. The three hand-picked pairs are chosen so that the log-ratio
difference ``h`` is positive, clearly negative and mildly negative.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import (
    LOSSES,
    REFERENCE_FREE,
    TRL_ALIASES,
    LossOutput,
    PairLogps,
    UnpairedLogps,
    dpo,
    hinge,
    ipo,
    kto,
    loss_hparam_names,
    orpo,
    preference_loss,
    robust,
    simpo,
    split_pair,
)

# (policy chosen, policy rejected, reference chosen, reference rejected, chosen tokens, rejected tokens)
ROWS = [
    (-10.0, -12.5, -11.0, -11.5, 4, 5),  # h = 1 - (-1) = 2: the policy already prefers the chosen side
    (-20.0, -15.0, -18.0, -16.0, 8, 3),  # h = -2 - 1 = -3: it prefers the rejected side
    (-7.25, -9.0, -7.0, -10.5, 2, 6),  # h = -0.25 - 1.5 = -1.75
]


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)), written per sign so it never overflows."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def h_of(row: tuple) -> float:
    pc, pr, rc, rr, _, _ = row
    return (pc - rc) - (pr - rr)


def pairs(rows: list[tuple] = ROWS, *, grad: bool = False) -> tuple[PairLogps, PairLogps]:
    """Policy and reference PairLogps (float64) from the rows; the policy's log-probs can need grad."""

    def column(i: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor([row[i] for row in rows], dtype=dtype)

    chosen_tokens, rejected_tokens = column(4, torch.long), column(5, torch.long)
    policy = PairLogps(column(0).requires_grad_(grad), column(1).requires_grad_(grad), chosen_tokens, rejected_tokens)
    reference = PairLogps(column(2), column(3), chosen_tokens, rejected_tokens)
    return policy, reference


def close(actual: torch.Tensor, expected: list[float] | float, tol: float = 1e-12) -> None:
    expected_t = torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected_t.shape, (actual.shape, expected_t.shape)
    assert torch.allclose(actual.detach().double(), expected_t, rtol=tol, atol=tol), (actual, expected_t)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_is_eq7(beta: float) -> None:
    out = dpo(*pairs(), beta=beta)
    close(out.losses, [-log_sigmoid(beta * h_of(r)) for r in ROWS])
    close(out.chosen_rewards, [beta * (r[0] - r[2]) for r in ROWS])
    close(out.rejected_rewards, [beta * (r[1] - r[3]) for r in ROWS])
    if beta == 0.1:
        # row 0 by hand: h = 2, -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693
        assert out.losses[0].item() == pytest.approx(0.5981388693, abs=1e-10)


def test_dpo_label_smoothing_is_conservative_dpo() -> None:
    beta, eps = 0.1, 0.2
    out = dpo(*pairs(), beta=beta, label_smoothing=eps)
    close(out.losses, [-(1 - eps) * log_sigmoid(beta * h_of(r)) - eps * log_sigmoid(-beta * h_of(r)) for r in ROWS])


def test_dpo_soft_preference_is_binary_cross_entropy() -> None:
    beta, q = 0.5, [1.0, 0.7, 0.0]
    out = dpo(*pairs(), beta=beta, preference=torch.tensor(q, dtype=torch.float64))
    close(out.losses, [-qi * log_sigmoid(beta * h_of(r)) - (1 - qi) * log_sigmoid(-beta * h_of(r)) for qi, r in zip(q, ROWS)])
    # q = 0 says the "rejected" side is the better one: the same as plain DPO on the swapped pair
    swapped = [(pr, pc, rr, rc, tr, tc) for pc, pr, rc, rr, tc, tr in ROWS]
    close(out.losses[2:], [dpo(*pairs(swapped), beta=beta).losses[2].item()])


def test_dpo_soft_preference_with_label_smoothing() -> None:
    beta, eps, q = 0.1, 0.1, [1.0, 0.7, 0.25]
    out = dpo(*pairs(), beta=beta, label_smoothing=eps, preference=torch.tensor(q, dtype=torch.float64))
    expected = []
    for qi, r in zip(q, ROWS):
        smoothed = qi * (1 - eps) + (1 - qi) * eps  # 1 -> 0.9, 0.7 -> 0.66, 0.25 -> 0.3
        expected.append(-smoothed * log_sigmoid(beta * h_of(r)) - (1 - smoothed) * log_sigmoid(-beta * h_of(r)))
    close(out.losses, expected)


@pytest.mark.parametrize("normalize", [False, True])
def test_ipo_is_eq17(normalize: bool) -> None:
    beta = 0.1
    out = ipo(*pairs(), beta=beta, normalize=normalize)
    expected = []
    for pc, pr, rc, rr, tc, tr in ROWS:
        h = (pc - rc) / tc - (pr - rr) / tr if normalize else (pc - rc) - (pr - rr)
        expected.append((h - 1 / (2 * beta)) ** 2)  # row 0 summed: (2 - 5)^2 = 9
    close(out.losses, expected)
    if not normalize:
        assert out.losses[0].item() == pytest.approx(9.0)
    close(out.chosen_rewards, [beta * (r[0] - r[2]) for r in ROWS])


def test_hinge_on_both_sides_of_the_kink() -> None:
    beta = 0.8
    policy, reference = pairs(grad=True)
    out = hinge(policy, reference, beta=beta)
    # row 0: 1 - 0.8 * 2 = -0.6 -> clamped to 0; rows 1, 2: 1 + 0.8 * 3 = 3.4 and 1 + 0.8 * 1.75 = 2.4
    close(out.losses, [0.0, 3.4, 2.4])
    out.losses.sum().backward()
    close(policy.chosen.grad, [0.0, -beta, -beta])  # no gradient once the margin is met
    close(policy.rejected.grad, [0.0, beta, beta])


def test_robust_is_unbiased_under_flips() -> None:
    beta, eps = 0.1, 0.1
    out = robust(*pairs(), beta=beta, label_smoothing=eps)
    expected = [((1 - eps) * -log_sigmoid(beta * h_of(r)) - eps * -log_sigmoid(-beta * h_of(r))) / (1 - 2 * eps) for r in ROWS]
    close(out.losses, expected)
    close(robust(*pairs(), beta=beta).losses, [-log_sigmoid(beta * h_of(r)) for r in ROWS])  # eps = 0 is DPO


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_simpo_is_eq6(gamma: float) -> None:
    beta = 2.0
    policy, _ = pairs()
    out = simpo(policy, None, beta=beta, gamma=gamma)
    # row 0: 2 * (-10 / 4) - 2 * (-12.5 / 5) - gamma = -5 + 5 - gamma
    close(out.losses, [-log_sigmoid(beta * pc / tc - beta * pr / tr - gamma) for pc, pr, _, _, tc, tr in ROWS])
    close(out.chosen_rewards, [beta * r[0] / r[4] for r in ROWS])
    close(out.rejected_rewards, [beta * r[1] / r[5] for r in ROWS])
    if gamma == 0.5:
        assert out.losses[0].item() == pytest.approx(-log_sigmoid(-0.5))


def log_odds(mean_logp: float) -> float:
    """log(p / (1 - p)) for p = exp(mean_logp); -expm1 keeps 1 - p exact near p = 1."""
    return mean_logp - math.log(-math.expm1(mean_logp))


def test_orpo_is_eqs_6_and_7() -> None:
    beta, lambda_ = 0.1, 0.25
    # mean log-probs -2.5/-2.5, -0.01/-1.5 (near p = 1, where 1 - p must not cancel), -0.5/-6.0
    rows = [(-10.0, -12.5, 0, 0, 4, 5), (-0.04, -3.0, 0, 0, 4, 2), (-1.0, -36.0, 0, 0, 2, 6)]
    policy, _ = pairs(rows)
    out = orpo(policy, None, beta=beta, lambda_=lambda_)
    nll = [-pc / tc for pc, _, _, _, tc, _ in rows]
    lo = [log_odds(pc / tc) - log_odds(pr / tr) for pc, pr, _, _, tc, tr in rows]
    close(out.losses, [n - lambda_ * log_sigmoid(x) for n, x in zip(nll, lo)])
    assert lo[0] == 0.0 and out.metrics["log_odds_ratio"][0].item() == pytest.approx(math.log(0.5))
    # log(1 - p) two ways: log1p(-p) is fine far from p = 1, and must agree with log(-expm1(.)) there
    assert math.log1p(-math.exp(-6.0)) == pytest.approx(math.log(-math.expm1(-6.0)), rel=1e-14)
    close(out.metrics["nll_loss"], nll)
    close(out.metrics["log_odds_chosen"], lo)
    close(out.metrics["log_odds_ratio"], [log_sigmoid(x) for x in lo])
    close(out.chosen_rewards, [beta * pc / tc for pc, _, _, _, tc, _ in rows])


def test_orpo_log_odds_stay_accurate_near_certainty_in_float32() -> None:
    # 1 - p for p = e^-1e-5 is 1e-5: computed as 1 - exp(x) in float32 it would lose ~3 digits
    # (exp(x) carries a 6e-8 rounding error), log(-expm1(x)) keeps them all
    chosen = torch.tensor([-1e-5, -2e-3], dtype=torch.float32)
    rejected = torch.tensor([-2.0, -0.5], dtype=torch.float32)
    ones = torch.ones(2, dtype=torch.long)
    out = orpo(PairLogps(chosen, rejected, ones, ones), None)
    expected = [log_odds(c) - log_odds(r) for c, r in zip(chosen.tolist(), rejected.tolist())]  # exact float32 inputs
    close(out.metrics["log_odds_chosen"], expected, tol=2e-6)


def unpaired(
    logps: list[float], ref: list[float], desirable: list[bool], kl_policy: list[float] | None = None,
    kl_ref: list[float] | None = None, grad: bool = False
) -> tuple[UnpairedLogps, UnpairedLogps]:
    """KTO inputs (float64); the policy's log-probs, and its mismatched-pair log-probs, can need grad."""

    def f64(values: list[float] | None, needs_grad: bool = False) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, dtype=torch.float64).requires_grad_(needs_grad)

    tokens = torch.full((len(logps),), 3)
    desirable_t = torch.tensor(desirable)
    policy = UnpairedLogps(f64(logps, grad), tokens, desirable_t, f64(kl_policy, grad))
    return policy, UnpairedLogps(f64(ref), tokens, desirable_t, f64(kl_ref))


def test_kto_is_eq8() -> None:
    beta, w_d, w_u = 0.1, 1.0, 1.33
    logps, ref, desirable = [-10.0, -12.0, -8.0, -15.0], [-11.0, -11.0, -9.5, -14.0], [True, False, True, False]
    policy, reference = unpaired(logps, ref, desirable, [-20.0, -21.0], [-20.5, -22.0])
    out = kto(policy, reference, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    z0 = ((-20.0 + 20.5) + (-21.0 + 22.0)) / 2  # 0.75
    r = [a - b for a, b in zip(logps, ref)]  # [1, -1, 1.5, -1]
    expected = [w_d * (1 - sigmoid(beta * (ri - z0))) if d else w_u * (1 - sigmoid(beta * (z0 - ri))) for ri, d in zip(r, desirable)]
    close(out.losses, expected)
    close(out.chosen_rewards, [beta * 1.0, beta * 1.5])
    close(out.rejected_rewards, [beta * -1.0, beta * -1.0])
    close(out.metrics["kl"], [z0] * 4)


def test_kto_baseline_is_clamped_and_not_differentiated() -> None:
    beta = 0.5
    # the mismatched pairs are likelier under the reference: the KL estimate is -1, clamped to 0
    policy, reference = unpaired([-10.0, -12.0], [-11.0, -11.0], [True, False], [-21.0, -22.0], [-20.0, -21.0], grad=True)
    out = kto(policy, reference, beta=beta)
    close(out.losses, [1 - sigmoid(beta * 1.0), 1 - sigmoid(beta * 1.0)])
    close(out.metrics["kl"], [0.0, 0.0])
    out.reduce().backward()
    assert policy.kl_logps.grad is None  # z0 is a baseline: no gradient reaches the mismatched pairs
    close(policy.logps.grad, [-0.5 * beta * sigmoid(0.5) * (1 - sigmoid(0.5)), 0.5 * beta * sigmoid(0.5) * (1 - sigmoid(0.5))])
    # given directly: a negative estimate is clamped, a positive one shifts both sides
    plain, ref = unpaired([-10.0, -12.0], [-11.0, -11.0], [True, False])
    close(kto(plain, ref, beta=beta, kl=torch.tensor(-0.3)).losses, [1 - sigmoid(0.5), 1 - sigmoid(0.5)])
    close(kto(plain, ref, beta=beta, kl=torch.tensor(0.2, dtype=torch.float64)).losses, [1 - sigmoid(0.5 * 0.8), 1 - sigmoid(0.5 * 1.2)])
    with pytest.raises(ValueError, match="KL baseline"):
        kto(plain, ref, beta=beta)


def test_nll_alpha_adds_the_rpo_term() -> None:
    beta, alpha = 0.1, 0.5
    out = preference_loss("dpo", *pairs(), nll_alpha=alpha, beta=beta)
    nll = [-r[0] / r[4] for r in ROWS]  # 2.5, 2.5, 3.625
    close(out.losses, [-log_sigmoid(beta * h_of(r)) + alpha * n for r, n in zip(ROWS, nll)])
    close(out.metrics["nll_loss"], nll)
    assert "nll_loss" not in preference_loss("dpo", *pairs(), beta=beta).metrics


def l2_chosen(policy: PairLogps, reference: PairLogps | None) -> torch.Tensor:
    return 0.001 * (policy.chosen**2).mean()


def reference_gap(policy: PairLogps, reference: PairLogps | None) -> torch.Tensor:
    return (policy.rejected - reference.rejected).mean().reshape(1)  # shape (1,) is a scalar too


def test_extra_terms_are_added_once_after_reduction() -> None:
    beta = 0.1
    policy, reference = pairs(grad=True)
    out = preference_loss("dpo", policy, reference, extra_terms=[l2_chosen, reference_gap], beta=beta)
    dpo_losses = [-log_sigmoid(beta * h_of(r)) for r in ROWS]
    close(out.losses, dpo_losses)  # per-example losses are untouched
    l2 = 0.001 * (100.0 + 400.0 + 7.25**2) / 3
    gap = ((-12.5 + 11.5) + (-15.0 + 16.0) + (-9.0 + 10.5)) / 3  # 0.5
    close(out.metrics["extra/l2_chosen"], [l2] * 3)
    close(out.metrics["extra/reference_gap"], [gap] * 3)
    close(out.reduce(), sum(dpo_losses) / 3 + l2 + gap)
    weights = [1.0, 2.0, 0.5]
    close(out.reduce(torch.tensor(weights)), sum(w * x for w, x in zip(weights, dpo_losses)) / 3.5 + l2 + gap)
    out.reduce().backward()  # the extra terms are part of the graph
    close(policy.chosen.grad, [-beta * sigmoid(-beta * h_of(r)) / 3 + 0.002 * r[0] / 3 for r in ROWS])


def test_reduce_is_a_weighted_mean() -> None:
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    out = LossOutput(losses, losses, losses)
    close(out.reduce(), 7.0 / 3)
    close(out.reduce(torch.tensor([1.0, 0.0, 3.0])), (1.0 + 12.0) / 4.0)
    close(out.reduce(torch.tensor([0, 0, 0])), 0.0)  # all weights zero: 0, not NaN


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_gradient_matches_the_hand_formula(eps: float) -> None:
    # dL/dz = sigmoid(z) - q' for z = beta h, so dL/d pi(yw) = beta (sigmoid(beta h) - q'), -beta sigmoid(-beta h) at q' = 1
    beta = 0.5
    policy, reference = pairs(grad=True)
    dpo(policy, reference, beta=beta, label_smoothing=eps).losses.sum().backward()
    expected = [beta * (sigmoid(beta * h_of(r)) - (1 - eps)) for r in ROWS]
    if eps == 0.0:
        close(torch.tensor(expected, dtype=torch.float64), [-beta * sigmoid(-beta * h_of(r)) for r in ROWS])
    close(policy.chosen.grad, expected)
    close(policy.rejected.grad, [-g for g in expected])


@pytest.mark.parametrize(
    "name, hparams",
    [("dpo", {"beta": 0.5, "label_smoothing": 0.1}), ("ipo", {"beta": 0.1, "normalize": True}), ("robust", {"beta": 0.3, "label_smoothing": 0.2}),
     ("simpo", {"beta": 2.0, "gamma": 0.5}), ("orpo", {"beta": 0.1, "lambda_": 0.3}), ("hinge", {"beta": 0.1})],
)
def test_gradcheck_float64(name: str, hparams: dict) -> None:
    _, reference = pairs()
    tokens = (reference.chosen_tokens, reference.rejected_tokens)
    start = torch.tensor([[-10.0, -20.0, -7.25], [-12.5, -15.0, -9.0]], dtype=torch.float64)
    if name == "orpo":
        start = start / 10  # keep mean log-probs away from 0, where log(1 - p) is steep
    def f(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return LOSSES[name](PairLogps(chosen, rejected, *tokens), reference, **hparams).losses
    assert torch.autograd.gradcheck(f, (start[0].clone().requires_grad_(), start[1].clone().requires_grad_()))


def test_gradcheck_kto_and_soft_dpo() -> None:
    desirable = torch.tensor([True, False, True])
    ref = torch.tensor([-11.0, -11.0, -9.5], dtype=torch.float64)
    def f(logps: torch.Tensor) -> torch.Tensor:
        policy, reference = UnpairedLogps(logps, torch.ones(3), desirable), UnpairedLogps(ref, torch.ones(3), desirable)
        return kto(policy, reference, beta=0.3, kl=torch.tensor(0.4)).losses
    assert torch.autograd.gradcheck(f, (torch.tensor([-10.0, -12.0, -8.0], dtype=torch.float64, requires_grad=True),))
    policy, reference = pairs(grad=True)
    soft = lambda c, r: dpo(PairLogps(c, r, *policy[2:]), reference, beta=0.5, preference=torch.tensor([0.9, 0.6, 0.3])).losses  # noqa: E731
    assert torch.autograd.gradcheck(soft, (policy.chosen, policy.rejected))


@pytest.mark.parametrize(
    "call",
    [
        *[lambda n=n: LOSSES[n](*pairs(), beta=0.0) for n in ("dpo", "ipo", "hinge", "robust", "simpo", "orpo")],
        lambda: dpo(*pairs(), beta=-0.1),
        lambda: kto(*unpaired([-1.0], [-1.0], [True]), beta=0.0, kl=torch.tensor(0.0)),
        lambda: kto(*unpaired([-1.0], [-1.0], [True]), undesirable_weight=0.0, kl=torch.tensor(0.0)),
        *[lambda e=e: dpo(*pairs(), label_smoothing=e) for e in (-0.1, 0.5, 0.7)],
        *[lambda e=e: robust(*pairs(), label_smoothing=e) for e in (-0.1, 0.5)],
        lambda: dpo(*pairs(), preference=torch.tensor([1.0, 1.2, 0.5])),
        lambda: simpo(pairs()[0], gamma=-0.1),
        lambda: orpo(pairs()[0], lambda_=-1.0),
        *[lambda n=n: preference_loss(n, *pairs(), preference=torch.tensor([1.0, 0.5, 0.5])) for n in ("ipo", "hinge", "robust", "simpo", "orpo")],
        *[lambda n=n: preference_loss(n, pairs()[0], None) for n in ("dpo", "ipo", "hinge", "robust")],
        lambda: preference_loss("kto", *pairs()),
        lambda: preference_loss("not_a_loss", *pairs()),
        lambda: preference_loss("dpo", *pairs(), nll_alpha=-0.1),
        lambda: preference_loss("dpo", *pairs(), extra_terms=[lambda p, r: p.chosen]),  # (3,), not a scalar
        lambda: preference_loss("dpo", *pairs(), extra_terms=[lambda p, r: 0.5]),  # not a tensor
    ],
)
def test_bad_settings_are_value_errors(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_error_messages_name_the_problem() -> None:
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss("dpo", pairs()[0], None)
    with pytest.raises(ValueError, match="no soft-label form"):
        preference_loss("ipo", *pairs(), preference=torch.tensor([1.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="'l2_vector' must return a scalar"):
        def l2_vector(policy: PairLogps, reference: PairLogps | None) -> torch.Tensor:
            return policy.chosen**2
        preference_loss("dpo", *pairs(), extra_terms=[l2_vector])


def test_hparam_names_and_reference_free_losses() -> None:
    f = ("f_divergence_type", "f_alpha_divergence_coef")
    expected = {
        "dpo": ("beta", "label_smoothing", *f),
        "ipo": ("beta", "normalize", *f),
        "hinge": ("beta", *f),
        "robust": ("beta", "label_smoothing", *f),
        "exo": ("beta", "label_smoothing", *f),
        "discopop": ("beta", "discopop_tau", *f),
        "dpo_norm": ("beta", *f),
        "nca": ("beta",), "bco": ("beta",), "sppo": ("beta",), "apo_zero": ("beta",), "apo_down": ("beta",), "sft": ("beta",),
        "aot": ("beta", "label_smoothing"), "aot_unpaired": ("beta", "label_smoothing"),
        "dpop": ("beta", "dpop_lambda"), "rdpo": ("beta", "rdpo_alpha"),
        "simpo": ("beta", "gamma"),
        "orpo": ("beta", "lambda_"),
        "cpo": ("beta", "label_smoothing"),
        "kto": ("beta", "desirable_weight", "undesirable_weight"),
    }
    expected |= {alias: expected[name] for alias, name in TRL_ALIASES.items()}
    assert {name: loss_hparam_names(name) for name in LOSSES} == expected
    assert {"simpo", "orpo", "cpo", "sft"} == REFERENCE_FREE
    for name in REFERENCE_FREE:
        assert preference_loss(name, pairs()[0], None).losses.shape == (3,)


def test_split_pair_takes_chosen_first() -> None:
    pair = split_pair(torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([1, 2, 3, 4]))
    assert pair.chosen.tolist() == [-1.0, -2.0] and pair.rejected.tolist() == [-3.0, -4.0]
    assert pair.chosen_tokens.tolist() == [1, 2] and pair.rejected_tokens.tolist() == [3, 4]
    assert PairLogps(*pair[:2], torch.tensor([0, 2]), pair.rejected_tokens).mean_chosen().tolist() == [-1.0, -1.0]


@pytest.mark.parametrize("name", ["dpo", "ipo", "robust", "simpo", "orpo"])
def test_very_negative_logps_are_finite(name: str) -> None:
    # float32 and summed log-probs of -5000 (a long, unlikely completion): nothing may overflow
    chosen = torch.tensor([-5000.0, -4000.0], requires_grad=True)
    rejected = torch.tensor([-100.0, -5000.0], requires_grad=True)
    tokens = torch.tensor([1, 2])
    reference = PairLogps(torch.tensor([-10.0, -4000.0]), torch.tensor([-100.0, -10.0]), tokens, tokens)
    hp = {"label_smoothing": 0.1} if name == "robust" else {}
    out = LOSSES[name](PairLogps(chosen, rejected, tokens, tokens), reference, **hp)
    out.reduce().backward()
    for value in (out.losses, chosen.grad, rejected.grad):
        assert torch.isfinite(value).all(), (name, value)
    if name == "dpo":  # beta h = 0.1 * (-4990 - 0) = -499: the loss is ~499, the gradient saturates at -beta / 2
        assert out.losses[0].item() == pytest.approx(499.0, rel=1e-6)
        assert chosen.grad[0].item() == pytest.approx(-0.1 / 2, rel=1e-6)
    if name == "orpo":  # log(1 - p) is 0 to float precision: the log-odds is the mean log-prob itself
        assert out.metrics["log_odds_chosen"][0].item() == pytest.approx(-5000.0 + 100.0, rel=1e-6)  # lo(-100) = -100 - log(1 - e^-100)


def test_orpo_gradient_is_finite_when_the_chosen_side_is_nearly_certain() -> None:
    lambda_ = 0.5
    chosen = torch.tensor([-3e-9], requires_grad=True)  # mean log-prob -1e-9: p(yw) = 1 - 1e-9
    rejected = torch.tensor([-3.0], requires_grad=True)  # mean -1
    tokens = torch.tensor([3])
    out = orpo(PairLogps(chosen, rejected, tokens, tokens), None, lambda_=lambda_)
    out.reduce().backward()
    # dL/dx_w = -1 - lambda * sigmoid(lo_l - lo_w) / (1 - p_w) = -1 - lambda * odds_l / (odds_l (1 - p_w) + p_w), x_w = chosen / 3
    x_w, odds_l = -1e-9, math.exp(-1.0) / -math.expm1(-1.0)
    expected = (-1 - lambda_ * odds_l / (odds_l * -math.expm1(x_w) + math.exp(x_w))) / 3
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert chosen.grad.item() == pytest.approx(expected, rel=1e-4)


def test_orpo_is_finite_when_both_sides_are_certain() -> None:
    # mean log-probs of exactly 0: the odds are infinite; the loss and gradients stay finite
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    tokens = torch.tensor([3])
    out = orpo(PairLogps(chosen, rejected, tokens, tokens), None, lambda_=0.5)
    out.reduce().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
