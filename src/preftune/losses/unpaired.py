"""KTO on unpaired examples (:class:`UnpairedLogps`): each completion judged desirable or not on its
own, against a reference (torch only)."""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.core import LossOutput, UnpairedLogps, _check


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

    Args:
        policy: the policy's :class:`UnpairedLogps`: ``logps`` (N,), ``desirable`` (N,) bool, ``kl_logps`` (M,) or None.
        reference: the reference's :class:`UnpairedLogps`: its ``logps`` (N,) and ``kl_logps`` (M,) or None are read.
        beta: scales ``r - z0`` and the logged rewards; > 0 (default 0.1).
        desirable_weight: ``w_d``, > 0 (default 1.0).
        undesirable_weight: ``w_u``, > 0 (default 1.0).
        kl: the KL estimate, a 0-dim tensor read instead of the ``kl_logps``; None: from them (default None).

    Returns:
        :class:`LossOutput`: ``losses`` (N,), one per example, unreduced; ``chosen_rewards`` (D,) and
        ``rejected_rewards`` (U,), ``beta * r`` of the D desirable and U undesirable examples (D + U = N; not (N,)
        each), detached; ``metrics``: ``kl`` (N,), ``z0`` repeated. Float, in the log-probs' dtype (promoted with
        ``kl``'s).
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
