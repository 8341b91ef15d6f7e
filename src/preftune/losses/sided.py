"""Losses that treat each side's log-ratio on its own, or the batch as a whole (torch only).

``r_w = beta (log pi(yw) - log ref(yw))`` and ``r_l`` likewise, on summed log-probs; these are
also the logged rewards. AOT and TRL's ``sft`` are batch-level: AOT's terms are of sorted
positions across the micro-batch, not of pairs, and ``sft`` is a token mean over the
micro-batch; both are what TRL 1.16 computes, and neither is a sum of per-pair terms, so under
gradient accumulation each is taken per micro-batch (as in TRL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import LossOutput, PairLogps, _check, _logratios


def _rewards(policy: PairLogps, reference: PairLogps, beta: float, name: str) -> tuple[Tensor, Tensor]:
    _check(beta > 0, f"{name} needs beta > 0, got {beta}")
    chosen_ratio, rejected_ratio = _logratios(policy, reference)
    return beta * chosen_ratio, beta * rejected_ratio


def nca(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Noise Contrastive Alignment, pairwise form (Chen et al. 2024, arXiv:2402.05369, NCA with K = 2,
    hard labels). TRL: ``nca_pair``. ``-log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l)``:
    each response's absolute likelihood is optimised, so the chosen one cannot fall.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales the log-ratios into ``r_w`` / ``r_l``; > 0 (default 0.1).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``r_w`` / ``r_l``, detached; ``metrics`` empty. Float, in the log-probs' dtype.
    """
    chosen, rejected = _rewards(policy, reference, beta, "nca")
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return LossOutput(losses, chosen.detach(), rejected.detach())


def bco(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Binary Classifier Optimization on pairs (Jung et al. 2024, arXiv:2404.04656, without the
    running reward shift): each side classified on its own, ``-log sigmoid(r_w) - log sigmoid(-r_l)``.
    TRL: ``bco_pair``.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales the log-ratios into ``r_w`` / ``r_l``; > 0 (default 0.1).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``r_w`` / ``r_l``, detached; ``metrics`` empty. Float, in the log-probs' dtype.
    """
    chosen, rejected = _rewards(policy, reference, beta, "bco")
    return LossOutput(-F.logsigmoid(chosen) - F.logsigmoid(-rejected), chosen.detach(), rejected.detach())


def sppo(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Self-Play Preference Optimization, hard-label form (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 of
    algorithm 1 with P(yw > yl) = 1 for the winner and 0 for the loser). TRL: ``sppo_hard``.
    ``(s_w - 1 / (2 beta))^2 + (s_l + 1 / (2 beta))^2`` with ``s`` the log-ratio (not scaled by beta).

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: the target log-ratios are ``+-1 / (2 beta)``, and it scales the logged rewards; > 0 (default 0.1).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * s_w`` / ``beta * s_l``, detached; ``metrics`` empty. Float, in the log-probs' dtype.
    """
    chosen, rejected = _rewards(policy, reference, beta, "sppo")
    losses = (chosen / beta - 0.5 / beta) ** 2 + (rejected / beta + 0.5 / beta) ** 2
    return LossOutput(losses, chosen.detach(), rejected.detach())


def apo_zero(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Anchored Preference Optimization, APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7).
    TRL: ``apo_zero``. ``(1 - sigmoid(r_w)) + sigmoid(r_l)``: raise the chosen likelihood and lower
    the rejected one, for when the chosen outputs are better than the model's own.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales the log-ratios into ``r_w`` / ``r_l``; > 0 (default 0.1).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``r_w`` / ``r_l``, detached; ``metrics`` empty. Float, in the log-probs' dtype.
    """
    chosen, rejected = _rewards(policy, reference, beta, "apo_zero")
    return LossOutput(1 - torch.sigmoid(chosen) + torch.sigmoid(rejected), chosen.detach(), rejected.detach())


def apo_down(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8). TRL: ``apo_down``. ``sigmoid(r_w) + (1 - sigmoid(r_w - r_l))``:
    lower both likelihoods, the rejected one more, for when the chosen outputs are worse than the model's own.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales the log-ratios into ``r_w`` / ``r_l``; > 0 (default 0.1).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``r_w`` / ``r_l``, detached; ``metrics`` empty. Float, in the log-probs' dtype.
    """
    chosen, rejected = _rewards(policy, reference, beta, "apo_down")
    return LossOutput(torch.sigmoid(chosen) + 1 - torch.sigmoid(chosen - rejected), chosen.detach(), rejected.detach())


def _smoothed_logistic(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Alignment via Optimal Transport, paired (Melnyk et al. 2024, arXiv:2406.05882, AOT paired). TRL: ``aot``.

    First-order stochastic dominance of the policy's margins over the reference's, in one dimension
    by sorting: ``d_i = sort(log pi(yw) - log pi(yl))_i - sort(log ref(yw) - log ref(yl))_i`` over
    the micro-batch, then the (smoothed) logistic loss on ``beta d_i``. Term ``i`` is of rank
    ``i``, not of pair ``i`` (batch-level; see the module docstring).

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales ``d_i``; > 0 (default 0.1).
        label_smoothing: the logistic loss's smoothing ``eps``, in [0, 0.5) (default 0.0).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), term ``i`` of rank ``i`` (not of pair ``i``), unreduced;
        ``chosen_rewards`` / ``rejected_rewards`` (batch,), per pair ``beta * (log pi(y) - log ref(y))``, detached;
        ``metrics`` empty. Float, in the log-probs' dtype.
    """
    _check(beta > 0, f"aot needs beta > 0, got {beta}")
    _check(0.0 <= label_smoothing < 0.5, f"aot needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    policy_margin, _ = torch.sort(policy.chosen - policy.rejected, dim=0)
    reference_margin, _ = torch.sort(reference.chosen - reference.rejected, dim=0)
    chosen, rejected = _logratios(policy, reference)
    losses = _smoothed_logistic(policy_margin - reference_margin, beta, label_smoothing)
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def aot_unpaired(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, AOT unpaired). TRL: ``aot_unpaired``. The chosen log-ratios' distribution
    dominates the rejected ones': ``d_i = sort(s_w)_i - sort(s_l)_i``, then the smoothed logistic loss.

    Args:
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps` (its ``chosen``/``rejected`` are read), each (batch,).
        beta: scales ``d_i``; > 0 (default 0.1).
        label_smoothing: the logistic loss's smoothing ``eps``, in [0, 0.5) (default 0.0).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), term ``i`` of rank ``i`` (not of pair ``i``), unreduced;
        ``chosen_rewards`` / ``rejected_rewards`` (batch,), per pair ``beta * (log pi(y) - log ref(y))``, detached;
        ``metrics`` empty. Float, in the log-probs' dtype.
    """
    _check(beta > 0, f"aot_unpaired needs beta > 0, got {beta}")
    _check(0.0 <= label_smoothing < 0.5, f"aot_unpaired needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen, rejected = _logratios(policy, reference)
    delta = torch.sort(chosen, dim=0)[0] - torch.sort(rejected, dim=0)[0]
    return LossOutput(_smoothed_logistic(delta, beta, label_smoothing), beta * chosen.detach(), beta * rejected.detach())


def sft(policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 0.1) -> LossOutput:
    """The NLL of the chosen completions as a preference-loss term (TRL: ``sft``; with ``dpo`` it makes
    RPO, Pang et al. 2024, eq. 3, and MPO-style mixtures): ``-sum_i log pi(yw_i) / sum_i |yw_i|``, a
    token mean over the micro-batch, written per pair as ``-log pi(yw_i) B / sum |yw|`` so that the
    mean of the terms is that token mean. Reference-free; ``beta`` only scales the logged rewards
    (``beta * mean log-prob``).

    Args:
        policy: the policy's :class:`PairLogps`, each (batch,): the chosen side's log-probs and counts make the loss.
        reference: not read (reference-free); default None.
        beta: scales only the logged rewards; > 0 (default 0.1).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), ``-log pi(yw_i) * batch / sum |yw|`` (their mean is the micro-batch's
        token mean), unreduced; ``chosen_rewards`` / ``rejected_rewards`` (batch,), ``beta * mean token log-prob`` of
        each side, detached; ``metrics`` empty. Float, in the log-probs' dtype.
    """
    _check(beta > 0, f"sft needs beta > 0, got {beta}")
    tokens = policy.chosen_tokens.sum().clamp(min=1).to(policy.chosen.dtype)
    losses = -policy.chosen * policy.chosen.shape[0] / tokens
    return LossOutput(losses, beta * policy.mean_chosen().detach(), beta * policy.mean_rejected().detach())
