"""One paired objective, or a weighted sum of several, plus the NLL and user terms (torch only).

``preference_loss(["dpo", "bco", "sft"], ..., weights=[0.8, 0.2, 1.0])`` is TRL's ``loss_type``
list with ``loss_weights`` (MPO, Wang et al. 2024): ``sum_k w_k L_k`` per pair, each term logged
as ``loss/<name>``. Each term reads only the settings its function takes; a setting no term takes
is an error. The logged rewards are the first term's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from preftune.losses.core import LossOutput, PairLogps

Loss = Callable[..., LossOutput]
#: A user-supplied extra term: (policy PairLogps, reference PairLogps | None) -> scalar tensor.
ExtraTerm = Callable[[PairLogps, "PairLogps | None"], Tensor]
_NOT_HPARAMS = {"policy", "reference", "preference", "kl"}


def hparam_names(fn: Loss) -> tuple[str, ...]:
    """The keyword hyperparameters a loss function takes (read from its signature)."""
    return tuple(p for p in inspect.signature(fn).parameters if p not in _NOT_HPARAMS)


def combine(
    terms: Sequence[tuple[str, Loss, float]], policy: PairLogps, reference: PairLogps | None,
    preference: Tensor | None, hparams: dict[str, object],
) -> LossOutput:
    """``sum_k w_k L_k`` over (name, function, weight) terms, each given the settings it takes."""
    used: set[str] = set()
    total: LossOutput | None = None
    for name, fn, weight in terms:
        own = hparam_names(fn)
        kwargs = {key: value for key, value in hparams.items() if key in own}
        used.update(kwargs)
        if preference is not None:
            kwargs["preference"] = preference
        out = fn(policy, reference, **kwargs)
        if len(terms) > 1:
            out.metrics[f"loss/{name}"] = out.losses.detach()
        if total is None:
            total = LossOutput(weight * out.losses, out.chosen_rewards, out.rejected_rewards, dict(out.metrics))
        else:
            total.losses = total.losses + weight * out.losses
            for key, value in out.metrics.items():
                total.metrics.setdefault(key, value)
    unused = sorted(set(hparams) - used)
    if unused:
        raise ValueError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not taken by loss "
                         f"{'+'.join(name for name, _, _ in terms)}")
    assert total is not None
    return total


def wpo_weights(aligned: PairLogps) -> Tensor:
    """WPO's pair weights (Zhou et al. 2024, arXiv:2406.11827, eq. 2): ``exp(mean aligned log-prob of yw) *
    exp(mean aligned log-prob of yl)`` from :func:`preftune.logprobs.wpo_logps` sums, no gradient (as TRL 1.16)."""
    return torch.exp(aligned.mean_chosen().detach()) * torch.exp(aligned.mean_rejected().detach())


def add_terms(out: LossOutput, policy: PairLogps, reference: PairLogps | None, nll_alpha: float, extra_terms: Sequence[ExtraTerm]) -> LossOutput:
    """RPO's per-pair NLL term (``nll_alpha`` times the chosen side's mean token NLL) and the user's scalar terms."""
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
