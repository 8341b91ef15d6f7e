"""Reference-free objectives, and those of the SFT and reward-model stages (torch only).

SimPO and ORPO need no reference and are length-normalised (they divide summed log-probs by the
token counts explicitly); their logged rewards are ``beta * mean token log-prob``. CPO needs none
either. ``sft_nll`` and ``bradley_terry`` are the SFT and reward-model stages' objectives. KTO,
unpaired but with a reference, is in :mod:`.unpaired`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import LossOutput, PairLogps, _check


def simpo(policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 2.0, gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised (TRL: CPOTrainer, loss_type="simpo"):
    ``-log sigmoid(beta / |yw| log pi(yw) - beta / |yl| log pi(yl) - gamma)``.

    Args:
        policy: the policy's :class:`PairLogps`: summed log-probs and token counts (both used), each (batch,).
        reference: not read (reference-free); default None.
        beta: scales the mean token log-probs into rewards; > 0 (default 2.0).
        gamma: the target reward margin, >= 0 (default 0.5).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * mean token log-prob``, detached; ``metrics`` empty. Float, in the log-probs' dtype.
    """
    _check(beta > 0, f"simpo needs beta > 0, got {beta}")
    _check(gamma >= 0, f"simpo needs gamma >= 0, got {gamma}")
    chosen_rewards = beta * policy.mean_chosen()
    rejected_rewards = beta * policy.mean_rejected()
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def cpo(policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Contrastive Preference Optimization's preference term (Xu et al. 2024, arXiv:2401.08417, eq. 3), reference-free:
    ``-log sigmoid(beta (log pi(yw) - log pi(yl)))`` on summed log-probs, with ``label_smoothing`` as conservative DPO's.
    TRL's CPOTrainer (loss_type sigmoid) adds ``cpo_alpha`` times the chosen side's NLL: ``loss.name=[cpo, sft]``
    with ``loss.weights=[1, cpo_alpha]``. Rewards: ``beta * log pi(y)``, as TRL logs them.

    Args:
        policy: the policy's :class:`PairLogps`, each (batch,): summed log-probs (token counts are not read).
        reference: not read (reference-free); default None.
        beta: scales the summed log-prob margin; > 0 (default 0.1).
        label_smoothing: conservative DPO's ``eps``, in [0, 0.5) (default 0.0).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * log pi(y)`` on summed log-probs, detached; ``metrics`` empty. Float, in the log-probs' dtype.
    """
    _check(beta > 0, f"cpo needs beta > 0, got {beta}")
    _check(0.0 <= label_smoothing < 0.5, f"cpo needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    margin = policy.chosen - policy.rejected
    losses = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    return LossOutput(losses, beta * policy.chosen.detach(), beta * policy.rejected.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x.

    Both branches of ``where`` are evaluated (and differentiated), so each gets an input on
    which it is finite; x = 0 (a certain completion, odds infinite) is held just below 0.
    """
    x = x.clamp(max=-1e-12)
    near_zero = torch.log(-torch.expm1(x.clamp(min=-math.log(2))))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2))))
    return torch.where(x > -math.log(2), near_zero, far)


def orpo(policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 0.1, lambda_: float = 0.1) -> LossOutput:
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free:
    ``L = NLL(yw) - lambda * log sigmoid(log odds(yw) - log odds(yl))`` with
    ``odds(y) = P(y) / (1 - P(y))`` on per-token average log-probs. NLL is the chosen side's
    per-token mean (per example; TRL averages over all the batch's tokens instead).
    ``beta`` only scales the logged rewards (``beta * mean log-prob``).

    Args:
        policy: the policy's :class:`PairLogps`: summed log-probs and token counts, each (batch,), as per-token means.
        reference: not read (reference-free); default None.
        beta: scales only the logged rewards; > 0 (default 0.1).
        lambda_: the odds-ratio term's weight ``lambda``, >= 0 (default 0.1).

    Returns:
        :class:`LossOutput`: ``losses`` (batch,), one per pair, unreduced; ``chosen_rewards`` / ``rejected_rewards``
        (batch,), ``beta * mean token log-prob``, detached; ``metrics``: ``nll_loss`` (the NLL), ``log_odds_ratio``
        (``log sigmoid`` of the log odds ratio) and ``log_odds_chosen`` (the log odds ratio itself), each (batch,),
        detached. Float, in the log-probs' dtype.
    """
    _check(beta > 0, f"orpo needs beta > 0, got {beta}")
    _check(lambda_ >= 0, f"orpo needs lambda_ >= 0, got {lambda_}")
    chosen, rejected = policy.mean_chosen(), policy.mean_rejected()
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen
    losses = nll - lambda_ * ratio
    metrics = {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach(), metrics)


def sft_nll(logps: Tensor, tokens: Tensor, *, total_tokens: Tensor | float | None = None) -> Tensor:
    """Supervised fine-tuning's next-token NLL: ``-sum(logps) / total_tokens``.

    ``logps`` (rows,) are summed completion log-probs, ``tokens`` (rows,) their token counts. The
    mean is per TOKEN (as transformers' causal-LM loss and TRL's SFTTrainer take it), over
    ``total_tokens``: this batch's tokens by default, the whole optimizer step's under gradient
    accumulation, so 8 micro-batches of 1 give exactly the update of one batch of 8.

    Args:
        logps: summed completion log-probs, (rows,) float.
        tokens: completion token counts, (rows,).
        total_tokens: the denominator (tensor or number, clamped to >= 1); None: ``tokens.sum()`` (default None).

    Returns:
        Tensor: the loss as a 0-dim tensor (already reduced, not per row), in ``logps``' dtype and on its device.
    """
    total = tokens.sum() if total_tokens is None else total_tokens
    return -logps.sum() / torch.as_tensor(total, dtype=logps.dtype, device=logps.device).clamp(min=1)


def bradley_terry(chosen_rewards: Tensor, rejected_rewards: Tensor, *, margin: Tensor | None = None) -> Tensor:
    """Per-pair reward-model loss ``-log sigmoid(r_chosen - r_rejected - margin)`` (B,).

    Bradley and Terry (1952); as a reward-model objective Ouyang et al. 2022, eq. 1. ``margin``
    is Llama 2's preference margin (Touvron et al. 2023, eq. 2): 0 when not given.

    Args:
        chosen_rewards: the reward model's scores of the chosen completions, (batch,) float.
        rejected_rewards: the scores of the rejected completions, (batch,).
        margin: the per-pair margin (batch,) subtracted from the difference; None: 0 (default None).

    Returns:
        Tensor: the losses (batch,), one per pair, unreduced, in the rewards' dtype.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
