"""Losses on DPO's log-ratio difference ``h`` (torch only): DPO and the objectives built on it.

``h = s(yw) - s(yl)`` where ``s`` is the log-ratio ``log pi(y|x) - log ref(y|x)`` on summed
log-probs, or its f-divergence score (:func:`preftune.losses.core.f_scores`) for the losses that
take ``f_divergence_type`` (TRL's rule: DPO, IPO, hinge, robust, EXO, DiscoPOP and
length-normalised DPO; the others have no f-divergence form and refuse a non-default one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import LossOutput, PairLogps, _check, score_difference

_REVERSE_KL = "reverse_kl"


def dpo(
    policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0, preference: Tensor | None = None,
    f_divergence_type: str = _REVERSE_KL, f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7). TRL: ``sigmoid``.

    ``L = -log sigmoid(beta * h)``, ``h = [log pi(yw) - log ref(yw)] - [log pi(yl) - log ref(yl)]``.
    With a target probability ``q`` that yw is preferred, the loss is the binary cross-entropy
    ``-q log sigmoid(beta h) - (1 - q) log sigmoid(-beta h)``: ``q = preference`` gives soft
    labels, and ``label_smoothing = eps`` moves ``q`` towards 1/2 (``q' = q (1 - eps) + (1 - q) eps``):
    conservative DPO (Mitchell 2023).

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: DPO's beta, the strength of the KL penalty, scaling ``h``; > 0 (default 0.1).
        label_smoothing: conservative DPO's ``eps``, in [0, 0.5) (default 0.0).
        preference: soft labels ``q`` (batch,) in [0, 1], the probability that yw is preferred; None: ``q = 1``.
        f_divergence_type: the score ``s`` in ``h``, one of :data:`F_DIVERGENCES` (default ``"reverse_kl"``).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"``, > 0 (default 0.5); unread by the other types.

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics`` empty. Float, in the
        log-probs' dtype.
    """
    _check(beta > 0, f"dpo needs beta > 0, got {beta}")
    _check(0.0 <= label_smoothing < 0.5, f"dpo needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h, _, _, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta, f_divergence_type, f_alpha_divergence_coef)
    q = torch.ones_like(h) if preference is None else preference.to(h)
    if preference is not None:
        _check(bool(((q >= 0) & (q <= 1)).all()), "preference probabilities must lie in [0, 1]")
    q = q * (1 - label_smoothing) + (1 - q) * label_smoothing
    losses = -q * F.logsigmoid(beta * h) - (1 - q) * F.logsigmoid(-beta * h)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def ipo(
    policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, normalize: bool = False,
    f_divergence_type: str = _REVERSE_KL, f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Identity Preference Optimization (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2``.

    ``h`` is built from summed log-probs as in the paper; ``normalize=True`` uses per-token
    average log-ratios instead, which is what TRL's ``ipo`` computes.

    Args:
        policy: the policy's :class:`PairLogps`: summed log-probs and token counts (if ``normalize``), each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: IPO's regulariser (the paper's tau): the target ``h`` is ``1 / (2 beta)``; > 0 (default 0.1).
        normalize: divide each side's score by the policy's token count, as TRL's ``ipo`` (default False).
        f_divergence_type: the score ``s`` in ``h``, one of :data:`F_DIVERGENCES` (default ``"reverse_kl"``).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"``, > 0 (default 0.5); unread by the other types.

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics`` empty. Float, in the
        log-probs' dtype.
    """
    _check(beta > 0, f"ipo needs beta > 0, got {beta}")
    h, chosen, rejected, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta, f_divergence_type, f_alpha_divergence_coef)
    if normalize:
        h = chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)
    return LossOutput((h - 1 / (2 * beta)) ** 2, chosen_rewards, rejected_rewards)


def hinge(
    policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, f_divergence_type: str = _REVERSE_KL, f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """SLiC's calibration hinge (Zhao et al. 2023, eq. 3) on reference-normalised log-likelihoods,
    as in Rafailov et al. 2023's comparison: ``max(0, 1 - beta * h)``. TRL: ``hinge``.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales ``h``, so the hinge is zero from ``h = 1 / beta`` on; > 0 (default 0.1).
        f_divergence_type: the score ``s`` in ``h``, one of :data:`F_DIVERGENCES` (default ``"reverse_kl"``).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"``, > 0 (default 0.5); unread by the other types.

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics`` empty. Float, in the
        log-probs' dtype.
    """
    _check(beta > 0, f"hinge needs beta > 0, got {beta}")
    h, _, _, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta, f_divergence_type, f_alpha_divergence_coef)
    return LossOutput(torch.relu(1 - beta * h), chosen_rewards, rejected_rewards)


def robust(
    policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
    f_divergence_type: str = _REVERSE_KL, f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, eq. 8): an unbiased loss under labels flipped with rate eps:
    ``[(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps)``, ``l(h) = -log sigmoid(beta h)``. TRL: ``robust``.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales ``h`` as in DPO; > 0 (default 0.1).
        label_smoothing: the assumed label-flip rate ``eps``, in [0, 0.5) (default 0.0: DPO).
        f_divergence_type: the score ``s`` in ``h``, one of :data:`F_DIVERGENCES` (default ``"reverse_kl"``).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"``, > 0 (default 0.5); unread by the other types.

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics`` empty. Float, in the
        log-probs' dtype.
    """
    _check(beta > 0, f"robust needs beta > 0, got {beta}")
    _check(0.0 <= label_smoothing < 0.5, f"robust needs 0 <= label_smoothing (the flip rate) < 0.5, got {label_smoothing}")
    h, _, _, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta, f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def exo(
    policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3,
    f_divergence_type: str = _REVERSE_KL, f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """EXO, efficient exact optimization (Ji et al. 2024, arXiv:2402.00856, eq. 16, K = 2). TRL: ``exo_pair``.

    ``KL(q || p)`` between the policy's distribution over the pair, ``q = (sigmoid(beta h),
    sigmoid(-beta h))``, and the smoothed labels ``p = (1 - eps, eps)``:
    ``q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)``. ``eps = label_smoothing`` must be
    > 0 (the paper uses 1e-3): at 0 the divergence is infinite.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales ``h`` in ``q``; > 0 (default 0.1).
        label_smoothing: the labels' ``eps``, in (0, 0.5) (default 1e-3, the paper's).
        f_divergence_type: the score ``s`` in ``h``, one of :data:`F_DIVERGENCES` (default ``"reverse_kl"``).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"``, > 0 (default 0.5); unread by the other types.

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics`` empty. Float, in the
        log-probs' dtype.
    """
    _check(beta > 0, f"exo needs beta > 0, got {beta}")
    _check(0.0 < label_smoothing < 0.5, f"exo needs 0 < label_smoothing (the paper's epsilon, e.g. 1e-3) < 0.5, got {label_smoothing}")
    h, _, _, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta, f_divergence_type, f_alpha_divergence_coef)
    qw, ql = torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
    losses = qw * (F.logsigmoid(beta * h) - math.log1p(-label_smoothing)) + ql * (F.logsigmoid(-beta * h) - math.log(label_smoothing))
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def discopop(
    policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, discopop_tau: float = 0.05,
    f_divergence_type: str = _REVERSE_KL, f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5). TRL: ``discopop``.

    With ``z = beta h`` and ``m = sigmoid(z / tau)``: ``(1 - m) (-log sigmoid(z)) + m exp(-z)``,
    a blend of the logistic (DPO) and exponential losses; the paper's ``tau`` is 0.05.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales ``h`` into ``z``; > 0 (default 0.1).
        discopop_tau: the modulation's temperature ``tau``, > 0 (default 0.05).
        f_divergence_type: the score ``s`` in ``h``, one of :data:`F_DIVERGENCES` (default ``"reverse_kl"``).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"``, > 0 (default 0.5); unread by the other types.

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics`` empty. Float, in the
        log-probs' dtype.
    """
    _check(beta > 0, f"discopop needs beta > 0, got {beta}")
    _check(discopop_tau > 0, f"discopop needs discopop_tau > 0, got {discopop_tau}")
    h, _, _, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta, f_divergence_type, f_alpha_divergence_coef)
    z = beta * h
    modulation = torch.sigmoid(z / discopop_tau)
    losses = -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def dpo_norm(
    policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, f_divergence_type: str = _REVERSE_KL, f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Length-normalised DPO (the "DPO with length normalisation" of Meng et al. 2024, SimPO, sec. 4.4 /
    table 5): DPO's eq. 7 on per-token average log-ratios, ``-log sigmoid(beta (s(yw)/|yw| - s(yl)/|yl|))``.
    TRL: ``sigmoid_norm``.

    Args:
        policy: the policy's :class:`PairLogps`: summed log-probs and token counts (the ``|y|`` here), each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales the per-token margin; > 0 (default 0.1).
        f_divergence_type: the score ``s`` in ``h``, one of :data:`F_DIVERGENCES` (default ``"reverse_kl"``).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"``, > 0 (default 0.5); unread by the other types.

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics`` empty. Float, in the
        log-probs' dtype.
    """
    _check(beta > 0, f"dpo_norm needs beta > 0, got {beta}")
    _, chosen, rejected, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta, f_divergence_type, f_alpha_divergence_coef)
    h = chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)
    return LossOutput(-F.logsigmoid(beta * h), chosen_rewards, rejected_rewards)


def dpop(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, arXiv:2402.13228, eq. 3); not in TRL.

    ``-log sigmoid(beta (h - lambda max(0, log ref(yw) - log pi(yw))))``: DPO, minus a penalty
    whenever the policy's likelihood of the chosen completion falls below the reference's, so
    that DPO's failure mode (both likelihoods falling, the chosen one less) is ruled out.
    The paper uses ``lambda`` = 50. The penalty is logged as ``dpop_penalty``.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales the penalised ``h``; > 0 (default 0.1).
        dpop_lambda: the penalty's weight ``lambda``, >= 0 (default 50.0).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics``: ``dpop_penalty``
        (batch,), the penalty before ``lambda``, detached. Float, in the log-probs' dtype.
    """
    _check(beta > 0, f"dpop needs beta > 0, got {beta}")
    _check(dpop_lambda >= 0, f"dpop needs dpop_lambda >= 0, got {dpop_lambda}")
    h, chosen, _, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta)
    penalty = torch.relu(-chosen)  # max(0, log ref(yw) - log pi(yw))
    losses = -F.logsigmoid(beta * (h - dpop_lambda * penalty))
    return LossOutput(losses, chosen_rewards, rejected_rewards, {"dpop_penalty": penalty.detach()})


def rdpo(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, rdpo_alpha: float = 0.01) -> LossOutput:
    """Length-regularised DPO, R-DPO (Park et al. 2024, arXiv:2403.19159, sec. 4); not in TRL.

    ``-log sigmoid(beta h + alpha (|yw| - |yl|))`` with ``|y|`` the completion's token count:
    the implicit reward of the length-penalised objective ``r(x, y) - alpha |y|``, so a longer
    chosen completion already carries its length in the margin and the policy is not pushed to
    lengthen. ``rdpo_alpha`` has no default in the paper (tuned per task there); preftune's is 0.01.

    Args:
        policy: the policy's :class:`PairLogps`: summed log-probs and token counts (the ``|y|`` here), each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales ``h``; > 0 (default 0.1).
        rdpo_alpha: the length penalty ``alpha`` per token, >= 0 (default 0.01).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * (log pi(y) - log ref(y))`` on summed log-probs, detached; ``metrics`` empty. Float, in the
        log-probs' dtype.
    """
    _check(beta > 0, f"rdpo needs beta > 0, got {beta}")
    _check(rdpo_alpha >= 0, f"rdpo needs rdpo_alpha >= 0, got {rdpo_alpha}")
    h, _, _, chosen_rewards, rejected_rewards = score_difference(policy, reference, beta)
    length_gap = (policy.chosen_tokens - policy.rejected_tokens).to(h.dtype)
    return LossOutput(-F.logsigmoid(beta * h + rdpo_alpha * length_gap), chosen_rewards, rejected_rewards)
