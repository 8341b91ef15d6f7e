"""Every training objective: pure functions on per-sequence log-probs or rewards (torch only).

This module imports torch and nothing of the project, so it can be read, tested and reused alone.
Bad hyperparameters raise ``ValueError``; the stages check the config before training, so a
user of the CLI meets those errors as config errors first.

Every paired loss has the signature ``loss(policy, reference, *, beta, ...) -> LossOutput`` where
``policy`` and ``reference`` are :class:`PairLogps` (summed completion log-probs and token counts
of the chosen and rejected sides; ``reference`` is None for reference-free losses). All are
per-example: ``out.losses`` has shape (batch,), reduced by :meth:`LossOutput.reduce`.

``chosen_rewards`` / ``rejected_rewards`` are the DPO implicit rewards
``beta * (log pi(y|x) - log pi_ref(y|x))`` on summed log-probs for every loss with a reference
(as TRL logs them), and ``beta * mean token log-prob`` for the reference-free ones (SimPO, ORPO).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairLogps(NamedTuple):
    """Summed completion log-probs (B,) and completion token counts (B,) of both sides."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def mean_chosen(self) -> Tensor:
        """Per-token average log-prob of the chosen completions."""
        return self.chosen / self.chosen_tokens.clamp(min=1).to(self.chosen.dtype)

    def mean_rejected(self) -> Tensor:
        """Per-token average log-prob of the rejected completions."""
        return self.rejected / self.rejected_tokens.clamp(min=1).to(self.rejected.dtype)


class UnpairedLogps(NamedTuple):
    """KTO's inputs: summed log-probs (N,), token counts (N,), which are desirable (N,) bool,
    and the summed log-probs of the mismatched (prompt, other completion) pairs used for the
    KL baseline (M,), or None when the baseline is given directly."""

    logps: Tensor
    tokens: Tensor
    desirable: Tensor
    kl_logps: Tensor | None = None


def split_pair(logps: Tensor, tokens: Tensor) -> PairLogps:
    """The concatenated batch's (2B,) results -> PairLogps (rows 0..B-1 chosen, B..2B-1 rejected)."""
    chosen, rejected = logps.chunk(2, dim=0)
    chosen_tokens, rejected_tokens = tokens.chunk(2, dim=0)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


@dataclass
class LossOutput:
    """Per-example losses and rewards, extra scalar terms, and per-example metrics."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    extra: Tensor | float = 0.0  # scalar added after reduction (user-supplied terms)

    def reduce(self, weight: Tensor | None = None, total_weight: Tensor | float | None = None) -> Tensor:
        """The (weighted) mean of the per-example losses, plus the extra terms.

        ``total_weight`` is the denominator: by default this batch's own weight, and under
        gradient accumulation the whole step's, so that the micro-batches' reduced losses add
        up to the loss of the step's full batch (the extra terms enter with this batch's share).
        """
        weight = torch.ones_like(self.losses) if weight is None else weight.to(self.losses)
        batch_weight = weight.sum()
        total = (batch_weight if total_weight is None else torch.as_tensor(total_weight).to(batch_weight)).clamp(min=1e-12)
        share = batch_weight / total  # all weights zero: a loss of 0, not NaN
        return (self.losses * weight).sum() / total + self.extra * share


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _logratios(policy: PairLogps, reference: PairLogps) -> tuple[Tensor, Tensor]:
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _implicit(policy: PairLogps, reference: PairLogps, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(h, chosen_rewards, rejected_rewards): h is the log-ratio difference of eq. 7."""
    chosen_ratio, rejected_ratio = _logratios(policy, reference)
    return chosen_ratio - rejected_ratio, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo(
    policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0, preference: Tensor | None = None
) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7).

    ``L = -log sigmoid(beta * h)``, ``h = [log pi(yw) - log ref(yw)] - [log pi(yl) - log ref(yl)]``.
    With a target probability ``q`` that yw is preferred, the loss is the binary cross-entropy
    ``-q log sigmoid(beta h) - (1 - q) log sigmoid(-beta h)``: ``q = preference`` gives soft
    labels, and ``label_smoothing = eps`` moves ``q`` towards 1/2 (``q' = q (1 - eps) + (1 - q) eps``):
    conservative DPO (Mitchell 2023).
    """
    _check(beta > 0, f"dpo needs beta > 0, got {beta}")
    _check(0.0 <= label_smoothing < 0.5, f"dpo needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _implicit(policy, reference, beta)
    q = torch.ones_like(h) if preference is None else preference.to(h)
    if preference is not None:
        _check(bool(((q >= 0) & (q <= 1)).all()), "preference probabilities must lie in [0, 1]")
    q = q * (1 - label_smoothing) + (1 - q) * label_smoothing
    losses = -q * F.logsigmoid(beta * h) - (1 - q) * F.logsigmoid(-beta * h)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def ipo(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, normalize: bool = False) -> LossOutput:
    """Identity Preference Optimization (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2``.

    ``h`` is built from summed log-probs as in the paper; ``normalize=True`` uses per-token
    average log-ratios instead, which is what TRL's ``ipo`` computes.
    """
    _check(beta > 0, f"ipo needs beta > 0, got {beta}")
    chosen_ratio, rejected_ratio = _logratios(policy, reference)
    if normalize:
        h = chosen_ratio / policy.chosen_tokens.clamp(min=1) - rejected_ratio / policy.rejected_tokens.clamp(min=1)
    else:
        h = chosen_ratio - rejected_ratio
    losses = (h - 1 / (2 * beta)) ** 2
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def hinge(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """SLiC's calibration hinge (Zhao et al. 2023, eq. 3) on reference-normalised log-likelihoods,
    as in Rafailov et al. 2023's comparison: ``max(0, 1 - beta * h)``."""
    _check(beta > 0, f"hinge needs beta > 0, got {beta}")
    h, chosen_rewards, rejected_rewards = _implicit(policy, reference, beta)
    return LossOutput(torch.relu(1 - beta * h), chosen_rewards, rejected_rewards)


def robust(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, eq. 8): an unbiased loss under labels flipped with rate eps:
    ``[(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps)``, ``l(h) = -log sigmoid(beta h)``."""
    _check(beta > 0, f"robust needs beta > 0, got {beta}")
    _check(0.0 <= label_smoothing < 0.5, f"robust needs 0 <= label_smoothing (the flip rate) < 0.5, got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _implicit(policy, reference, beta)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def simpo(policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 2.0, gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:
    ``-log sigmoid(beta / |yw| log pi(yw) - beta / |yl| log pi(yl) - gamma)``."""
    _check(beta > 0, f"simpo needs beta > 0, got {beta}")
    _check(gamma >= 0, f"simpo needs gamma >= 0, got {gamma}")
    chosen_rewards = beta * policy.mean_chosen()
    rejected_rewards = beta * policy.mean_rejected()
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


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
    ``beta`` only scales the logged rewards (``beta * mean log-prob``)."""
    _check(beta > 0, f"orpo needs beta > 0, got {beta}")
    _check(lambda_ >= 0, f"orpo needs lambda_ >= 0, got {lambda_}")
    chosen, rejected = policy.mean_chosen(), policy.mean_rejected()
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen
    losses = nll - lambda_ * ratio
    metrics = {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach(), metrics)


def kto(
    policy: UnpairedLogps,
    reference: UnpairedLogps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: Tensor | None = None,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples.

    ``r = log pi(y|x) - log ref(y|x)``; ``z0 = max(0, mean KL estimate)`` from mismatched pairs
    (``policy.kl_logps - reference.kl_logps``) or given as ``kl``; it is a baseline, not
    differentiated. Desirable: ``w_d (1 - sigmoid(beta (r - z0)))``; undesirable:
    ``w_u (1 - sigmoid(beta (z0 - r)))``. ``chosen_rewards`` / ``rejected_rewards`` hold
    ``beta r`` of the desirable / undesirable examples.
    """
    _check(beta > 0, f"kto needs beta > 0, got {beta}")
    _check(desirable_weight > 0 and undesirable_weight > 0, "kto needs desirable_weight and undesirable_weight > 0")
    ratio = policy.logps - reference.logps
    if kl is None:
        if policy.kl_logps is None or reference.kl_logps is None:
            raise ValueError("kto needs the KL baseline: kl_logps on both sides, or kl=")
        kl = (policy.kl_logps - reference.kl_logps).mean()
    z0 = kl.detach().clamp(min=0)
    desirable = policy.desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    rewards = beta * ratio.detach()
    return LossOutput(losses, rewards[desirable], rewards[~desirable], {"kl": z0.expand(ratio.shape[0])})


Loss = Callable[..., LossOutput]
LOSSES: dict[str, Loss] = {"dpo": dpo, "ipo": ipo, "hinge": hinge, "robust": robust, "simpo": simpo, "orpo": orpo, "kto": kto}
REFERENCE_FREE = frozenset({"simpo", "orpo"})
SOFT_LABELS = frozenset({"dpo"})
_NOT_HPARAMS = {"policy", "reference", "preference", "kl"}


def loss_hparam_names(name: str) -> tuple[str, ...]:
    """The keyword hyperparameters loss ``name`` takes (read from its signature)."""
    params = inspect.signature(LOSSES[name]).parameters
    return tuple(p for p in params if p not in _NOT_HPARAMS)


#: A user-supplied extra term: (policy PairLogps, reference PairLogps | None) -> scalar tensor.
ExtraTerm = Callable[[PairLogps, "PairLogps | None"], Tensor]


def preference_loss(
    name: str,
    policy: PairLogps,
    reference: PairLogps | None,
    *,
    nll_alpha: float = 0.0,
    extra_terms: Sequence[ExtraTerm] = (),
    preference: Tensor | None = None,
    **hparams: float,
) -> LossOutput:
    """Apply paired loss ``name``, then the optional NLL term and the user's extra terms.

    ``nll_alpha > 0`` adds ``nll_alpha * (-mean token log-prob of the chosen completion)`` per
    example (RPO, Pang et al. 2024). Each extra term is called as ``term(policy, reference)`` and
    must return a scalar; its value is logged as ``extra/<name>``.
    """
    if name not in LOSSES or name == "kto":
        raise ValueError(f"'{name}' is not a paired loss; paired losses: {', '.join(n for n in LOSSES if n != 'kto')}")
    _check(nll_alpha >= 0, f"nll_alpha must be >= 0, got {nll_alpha}")
    if reference is None and name not in REFERENCE_FREE:
        raise ValueError(f"loss '{name}' needs reference log-probs")
    kwargs = dict(hparams)
    if preference is not None:
        if name not in SOFT_LABELS:
            raise ValueError(
                f"the data carries soft preference labels (preference < 1) and loss '{name}' has no soft-label form; use loss.name=dpo"
            )
        kwargs["preference"] = preference
    out = LOSSES[name](policy, reference, **kwargs)
    if nll_alpha > 0:
        nll = -policy.mean_chosen()
        out.losses = out.losses + nll_alpha * nll
        out.metrics.setdefault("nll_loss", nll.detach())
    extra: Tensor | float = 0.0
    for index, term in enumerate(extra_terms):
        value = term(policy, reference)
        if not isinstance(value, Tensor) or value.numel() != 1:
            label = getattr(term, "__name__", f"term {index}")
            raise ValueError(f"extra loss term '{label}' must return a scalar tensor, got {type(value).__name__}")
        extra = extra + value.reshape(())
        label = getattr(term, "__name__", str(index))
        out.metrics[f"extra/{label}"] = value.detach().reshape(()).expand(out.losses.shape[0])
    out.extra = extra
    return out



# --------------------------------------------------------------------------- SFT and reward models
def sft_nll(logps: Tensor, tokens: Tensor, *, total_tokens: Tensor | float | None = None) -> Tensor:
    """Supervised fine-tuning's next-token NLL: ``-sum(logps) / total_tokens``.

    ``logps`` (rows,) are summed completion log-probs, ``tokens`` (rows,) their token counts. The
    mean is per TOKEN (as transformers' causal-LM loss and TRL's SFTTrainer take it), over
    ``total_tokens``: this batch's tokens by default, the whole optimizer step's under gradient
    accumulation, so 8 micro-batches of 1 give exactly the update of one batch of 8.
    """
    total = tokens.sum() if total_tokens is None else total_tokens
    return -logps.sum() / torch.as_tensor(total, dtype=logps.dtype, device=logps.device).clamp(min=1)


def bradley_terry(chosen_rewards: Tensor, rejected_rewards: Tensor, *, margin: Tensor | None = None) -> Tensor:
    """Per-pair reward-model loss ``-log sigmoid(r_chosen - r_rejected - margin)`` (B,).

    Bradley and Terry (1952); as a reward-model objective Ouyang et al. 2022, eq. 1. ``margin``
    is Llama 2's preference margin (Touvron et al. 2023, eq. 2): 0 when not given.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
