"""The loss family's types and shared pieces (torch only): PairLogps, LossOutput, f-divergence scores.

``PairLogps`` holds summed completion log-probs and token counts of both sides; ``LossOutput``
holds per-example losses (B,) and the logged rewards, reduced by :meth:`LossOutput.reduce`
(weighted by the data's per-record weights, over the whole optimizer step's total weight).

The log-ratio scores of f-DPO (Wang et al. 2024, "Beyond Reverse KL", arXiv:2309.16240, Thm. 1):
with ``u = log pi(y|x) - log ref(y|x)`` the implicit reward is ``f'(exp(u))``; reverse KL
gives ``u`` itself (DPO), forward KL ``1 - exp(-u)``, Jensen-Shannon ``log 2 + log sigmoid(u)``
and the alpha-divergence ``(exp((alpha - 1) u) - 1) / (alpha - 1)`` (as TRL 1.16 writes it,
clamped at exponent 80 so it stays finite in fp32).
"""

from __future__ import annotations

import math
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


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_scores(ratio: Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """``f'(exp(u))`` of the log-ratio ``u`` (see the module docstring); reverse KL returns ``u``."""
    if f_divergence_type == "reverse_kl":
        return ratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(ratio)
    if f_divergence_type == "alpha_divergence":
        _check(f_alpha_divergence_coef > 0, f"f_alpha_divergence_coef must be > 0, got {f_alpha_divergence_coef}")
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:  # the limit alpha -> 1 is reverse KL
            return ratio
        t = ((f_alpha_divergence_coef - 1.0) * ratio).clamp(max=80.0)
        return torch.expm1(t) / (f_alpha_divergence_coef - 1.0)
    raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got '{f_divergence_type}'")


def score_difference(
    policy: PairLogps, reference: PairLogps, beta: float, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(h, chosen scores, rejected scores, chosen_rewards, rejected_rewards) under an f-divergence.

    ``h = f'(chosen ratio) - f'(rejected ratio)`` is DPO's log-ratio difference (eq. 7) under
    reverse KL; the rewards are always the DPO implicit rewards ``beta * ratio`` (as TRL logs them).
    """
    chosen_ratio, rejected_ratio = _logratios(policy, reference)
    chosen = f_scores(chosen_ratio, f_divergence_type, f_alpha_divergence_coef)
    rejected = f_scores(rejected_ratio, f_divergence_type, f_alpha_divergence_coef)
    return chosen - rejected, chosen, rejected, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
