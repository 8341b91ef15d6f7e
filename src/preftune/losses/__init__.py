"""Every training objective: pure functions on per-sequence log-probs or rewards (torch only).

This package imports torch and nothing else of the project, so it can be read, tested and
reused alone. Bad hyperparameters raise ``ValueError``; the stages check the config before
training (:func:`preftune.config.schema.validate` calls :func:`check_settings`), so a user of the
CLI meets those errors as config errors first.

Every paired loss has the signature ``loss(policy, reference, *, beta, ...) -> LossOutput`` where
``policy`` and ``reference`` are :class:`PairLogps` (summed completion log-probs and token counts
of the chosen and rejected sides; ``reference`` is None for reference-free losses). All are
per-example: ``out.losses`` has shape (batch,), reduced by :meth:`LossOutput.reduce`.

``chosen_rewards`` / ``rejected_rewards`` are the DPO implicit rewards
``beta * (log pi(y|x) - log pi_ref(y|x))`` on summed log-probs for every loss with a reference
(as TRL logs them), ``beta * mean token log-prob`` for SimPO, ORPO and sft, and ``beta * log pi(y)`` for CPO.

Losses are named after their papers; every TRL 1.16 ``loss_type`` is a name too (:data:`TRL_ALIASES`
maps the ones that differ), in :data:`LOSSES`, ``loss.name`` and ``--sweep loss.name=...``.
Modules: :mod:`.core` (types, f-divergence scores), :mod:`.paired` (losses on DPO's ``h``),
:mod:`.sided` (each side's log-ratio, or the batch), :mod:`.free` (reference-free, SFT,
reward models), :mod:`.unpaired` (KTO), :mod:`.combine` (weighted lists of losses, NLL and user terms).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from preftune.losses.combine import ExtraTerm, Loss, add_terms, combine, hparam_names, wpo_weights
from preftune.losses.core import F_DIVERGENCES, LossOutput, PairLogps, UnpairedLogps, f_scores, split_pair
from preftune.losses.free import bradley_terry, cpo, orpo, sft_nll, simpo
from preftune.losses.paired import discopop, dpo, dpo_norm, dpop, exo, hinge, ipo, rdpo, robust
from preftune.losses.sided import aot, aot_unpaired, apo_down, apo_zero, bco, nca, sft, sppo
from preftune.losses.unpaired import kto

__all__ = ["F_DIVERGENCES", "LOSSES", "REFERENCE_FREE", "SOFT_LABELS", "TRL_ALIASES", "ExtraTerm", "Loss", "LossOutput", "PairLogps",
           "UnpairedLogps", "aot", "aot_unpaired", "apo_down", "apo_zero", "bco", "bradley_terry", "canonical", "cpo", "check_settings",
           "discopop", "dpo", "dpo_norm", "dpop", "exo", "f_scores", "hinge", "ipo", "kto", "loss_hparam_names", "nca",
           "needs_reference", "orpo", "preference_loss", "rdpo", "robust", "sft", "sft_nll", "simpo", "split_pair", "sppo", "wpo_weights"]

#: preftune's paper names, the whole family. TRL's loss_type names that differ are added below.
_PAPER: dict[str, Loss] = {
    "dpo": dpo, "ipo": ipo, "hinge": hinge, "robust": robust, "exo": exo, "discopop": discopop, "dpo_norm": dpo_norm,
    "nca": nca, "bco": bco, "sppo": sppo, "apo_zero": apo_zero, "apo_down": apo_down, "aot": aot, "aot_unpaired": aot_unpaired,
    "sft": sft, "dpop": dpop, "rdpo": rdpo, "simpo": simpo, "orpo": orpo, "cpo": cpo, "kto": kto,
}
#: TRL 1.16 DPOConfig.loss_type -> preftune's name, where they differ (the others are the same word).
TRL_ALIASES = {"sigmoid": "dpo", "exo_pair": "exo", "nca_pair": "nca", "bco_pair": "bco", "sppo_hard": "sppo", "sigmoid_norm": "dpo_norm"}
LOSSES: dict[str, Loss] = _PAPER | {alias: _PAPER[name] for alias, name in TRL_ALIASES.items()}
REFERENCE_FREE = frozenset({"simpo", "orpo", "cpo", "sft"})
SOFT_LABELS = frozenset({"dpo"})
#: the losses whose implicit reward generalises to an f-divergence (TRL 1.16's rule; sft has no reward to change)
F_DIVERGENCE_LOSSES = frozenset({"dpo", "dpo_norm", "hinge", "ipo", "exo", "robust", "discopop", "sft"})


def canonical(name: str) -> str:
    """preftune's name of loss ``name`` (a paper name, or TRL's loss_type)."""
    return TRL_ALIASES.get(name, name)


def _names(name: str | Sequence[str]) -> list[str]:
    return [name] if isinstance(name, str) else list(name)


def needs_reference(name: str | Sequence[str]) -> bool:
    """Whether loss ``name`` (or any term of a list) reads reference log-probs."""
    return any(canonical(n) not in REFERENCE_FREE for n in _names(name))


def loss_hparam_names(name: str | Sequence[str]) -> tuple[str, ...]:
    """The keyword hyperparameters loss ``name`` takes (read from its signature; a list: any term's)."""
    seen: dict[str, None] = {}
    for n in _names(name):
        seen.update(dict.fromkeys(hparam_names(LOSSES[n])))
    return tuple(seen)


def check_settings(name: str | Sequence[str], weights: Sequence[float] | None = None, **hparams: object) -> None:
    """Raise ``ValueError`` if loss ``name`` (or a list with ``weights``) refuses these settings.

    Each term runs once on a one-pair batch, so the functions' own range checks are the ones
    applied, and TRL's f-divergence rule is kept for lists.
    """
    names = _names(name)
    unknown = [n for n in names if n not in LOSSES or n == "kto"]
    if unknown or not names:
        raise ValueError(f"'{(unknown or ['(none)'])[0]}' is not a paired loss; paired losses: {', '.join(n for n in LOSSES if n != 'kto')}")
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"weights has {len(weights)} values for {len(names)} losses ({', '.join(names)})")
    if weights is not None and not all(w >= 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    if hparams.get("f_divergence_type", "reverse_kl") != "reverse_kl":
        refused = [n for n in names if canonical(n) not in F_DIVERGENCE_LOSSES]
        if refused:
            raise ValueError(f"f_divergence_type={hparams['f_divergence_type']} is only for the losses built on the reward "
                             f"difference ({', '.join(sorted(F_DIVERGENCE_LOSSES))}), not {', '.join(refused)}")
    one = PairLogps(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([1]), torch.tensor([1]))
    combine([(n, LOSSES[n], 1.0) for n in names], one, one, None, dict(hparams))


def preference_loss(
    name: str | Sequence[str],
    policy: PairLogps,
    reference: PairLogps | None,
    *,
    weights: Sequence[float] | None = None,
    nll_alpha: float = 0.0,
    extra_terms: Sequence[ExtraTerm] = (),
    preference: Tensor | None = None,
    pair_weights: Tensor | None = None,
    **hparams: object,
) -> LossOutput:
    """Apply paired loss ``name`` (or the ``weights``-weighted sum of a list), then the NLL and user terms.

    ``nll_alpha > 0`` adds ``nll_alpha * (-mean token log-prob of the chosen completion)`` per
    example (RPO, Pang et al. 2024). Each extra term is called as ``term(policy, reference)`` and
    must return a scalar; its value is logged as ``extra/<name>``. ``pair_weights`` (WPO's
    :func:`wpo_weights`) multiply every term of every pair, as TRL's ``use_weighting`` does.

    Args:
        name: a loss of :data:`LOSSES` (a paper name or TRL's ``loss_type``, not ``kto``), or a list of them.
        policy: the policy's :class:`PairLogps`: summed completion log-probs and token counts, each (batch,).
        reference: the reference model's :class:`PairLogps`, each (batch,); None only if every term is reference-free.
        weights: one weight ``w_k`` per name in ``sum_k w_k L_k``; None: all 1 (default None).
        nll_alpha: RPO's weight of the chosen side's mean token NLL per pair, >= 0 (default 0.0: off).
        extra_terms: user terms ``term(policy, reference) -> scalar tensor`` (default none).
        preference: soft labels (batch,) in [0, 1], for the losses of :data:`SOFT_LABELS` only; None: hard labels.
        pair_weights: per-pair weights (batch,) (WPO's), multiplying ``sum_k w_k L_k``; refused with aot, aot_unpaired.
        **hparams: the losses' keyword settings (``beta``, ...): each term gets those it takes; an unused one raises.

    Returns:
        :class:`LossOutput`: ``losses`` (batch,) ``= pair_weights * sum_k w_k L_k + nll_alpha * NLL``, unreduced;
        ``chosen_rewards`` / ``rejected_rewards`` (batch,), the first term's; ``metrics``: the terms' own (the first
        term's on a clash), ``loss/<name>`` (batch,) per term when ``name`` is a list (unweighted), ``nll_loss``
        (batch,) when ``nll_alpha > 0`` (unless a term logs its own, as ORPO), ``extra/<name>`` (batch,) each term's
        value repeated; ``extra``: the extra terms' sum as a 0-dim tensor (0.0 without any), added by
        :meth:`LossOutput.reduce`.
    """
    names = _names(name)
    if not names or any(n not in LOSSES or n == "kto" for n in names):
        raise ValueError(f"'{name}' is not a paired loss; paired losses: {', '.join(n for n in LOSSES if n != 'kto')}")
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"weights has {len(weights)} values for {len(names)} losses ({', '.join(names)})")
    if nll_alpha < 0:
        raise ValueError(f"nll_alpha must be >= 0, got {nll_alpha}")
    if reference is None and needs_reference(names):
        raise ValueError(f"loss '{'+'.join(names)}' needs reference log-probs")
    if preference is not None and not all(canonical(n) in SOFT_LABELS for n in names):
        raise ValueError(
            f"the data carries soft preference labels (preference < 1) and loss '{'+'.join(names)}' has no soft-label form; use loss.name=dpo"
        )
    terms = [(n, LOSSES[n], 1.0 if weights is None else float(w)) for n, w in zip(names, weights or [None] * len(names))]
    out = combine(terms, policy, reference, preference, hparams)
    if pair_weights is not None:
        if any(canonical(n) in ("aot", "aot_unpaired") for n in names):
            raise ValueError("WPO weighting is per pair, and aot's terms are of ranks across the batch (TRL refuses it too)")
        out.losses = out.losses * pair_weights
    return add_terms(out, policy, reference, nll_alpha, extra_terms)
