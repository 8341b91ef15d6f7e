"""Parity with TRL 1.16.0 for the whole paired family: every ``loss_type``, lists with ``loss_weights``
and every ``f_divergence_type``, through TRL's own ``DPOTrainer._compute_loss`` on identical
log-probs (the stand-in trainer of ``test_losses_trl_parity.py``), to 1e-6.

Settings map one to one, with two exceptions pinned in ``test_losses_trl_parity.py``: TRL's
``ipo`` is ours with ``normalize=True``, and TRL's ``sigmoid`` ignores ``label_smoothing`` (so
``label_smoothing`` is given only to the losses that read it in TRL: robust, exo_pair, aot, aot_unpaired).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from preftune.losses import LOSSES, PairLogps, canonical, preference_loss  # noqa: E402
from test_losses_trl_parity import FakeLM, dpo_batch, ours_paired, trainer_shim  # noqa: E402

SEEDS = range(4)
TRL_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
             "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}


def run_trl(loss_types: list[str], seed: int, *, beta: float = 0.1, weights: list[float] | None = None, label_smoothing: float = 0.0,
            f_divergence_type: str = "reverse_kl", alpha: float = 0.5,
            tau: float = 0.05) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, PairLogps]:
    """TRL's batch loss (backpropagated into the per-token log-probs), its metrics, and our inputs.
    The alpha-divergence runs in float32: TRL's clamp table has no float64 entry."""
    from trl.trainer.dpo_trainer import DPOTrainer

    inputs, per_token, tokens, reference = dpo_batch(seed)
    if f_divergence_type == "alpha_divergence":
        per_token = per_token.detach().float().requires_grad_()
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = inputs["ref_chosen_logps"].float(), inputs["ref_rejected_logps"].float()
        reference = PairLogps(reference.chosen.float(), reference.rejected.float(), reference.chosen_tokens, reference.rejected_tokens)
    shim = trainer_shim(
        beta=beta, loss_types=loss_types, loss_weights=weights or [1.0] * len(loss_types), label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=alpha, ld_alpha=None, use_weighting=False,
        args=SimpleNamespace(discopop_tau=tau),
    )
    loss = DPOTrainer._compute_loss(shim, FakeLM((inputs["input_ids"], per_token)), inputs, False)
    loss.backward()
    return loss, {k: v[-1] for k, v in shim._metrics["train"].items()}, per_token, tokens, reference


def ours(loss_types: list[str], per_token: torch.Tensor, tokens: torch.Tensor, reference: PairLogps, **settings: object):
    """Our loss on the same log-probs, each term given the settings it takes in TRL."""
    policy, leaf = ours_paired(per_token, tokens)
    hparams: dict[str, object] = {"beta": settings.get("beta", 0.1)}
    if "ipo" in loss_types:
        hparams["normalize"] = True
    if SMOOTHED & set(loss_types):
        hparams["label_smoothing"] = settings.get("label_smoothing", 0.0)
    if "discopop" in loss_types:
        hparams["discopop_tau"] = settings.get("tau", 0.05)
    if settings.get("f_divergence_type", "reverse_kl") != "reverse_kl":
        hparams["f_divergence_type"] = settings["f_divergence_type"]
        hparams["f_alpha_divergence_coef"] = settings.get("alpha", 0.5)
    out = preference_loss(loss_types if len(loss_types) > 1 else loss_types[0], policy, reference, weights=settings.get("weights"), **hparams)
    return out, leaf


def assert_same(loss: torch.Tensor, metrics: dict, per_token: torch.Tensor, out, leaf: torch.Tensor, label: object) -> None:
    total = out.reduce()
    assert total.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-9), label
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-6, abs=1e-9), label
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-6, abs=1e-9), label
    total.backward()
    # the scored positions (TRL's sft term reads only those; a sum also reaches the zeros off the completion)
    scored = per_token.detach() != 0
    atol = 1e-9 if per_token.dtype == torch.float64 else 1e-7  # float32: a few units of its rounding (1.2e-7) near 0
    assert torch.allclose(leaf.grad[scored], per_token.grad[scored], rtol=1e-6, atol=atol), label


@pytest.mark.parametrize("loss_type", TRL_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_every_trl_loss_type_matches(loss_type: str, beta: float) -> None:
    label_smoothing = 1e-3 if loss_type == "exo_pair" else 0.1 if loss_type in SMOOTHED else 0.0
    for seed in SEEDS:
        loss, metrics, per_token, tokens, reference = run_trl([loss_type], seed, beta=beta, label_smoothing=label_smoothing)
        out, leaf = ours([loss_type], per_token, tokens, reference, beta=beta, label_smoothing=label_smoothing)
        if loss_type == "sft":  # reference-free: our logged rewards are beta * mean log-prob, TRL's beta * log-ratio
            assert out.reduce().item() == pytest.approx(loss.item(), rel=1e-6), seed
            out.reduce().backward()
            scored = per_token.detach() != 0
            assert torch.allclose(leaf.grad[scored], per_token.grad[scored], rtol=1e-6, atol=1e-9), seed
            continue
        assert_same(loss, metrics, per_token, out, leaf, (loss_type, seed))
        assert LOSSES[loss_type] is LOSSES[canonical(loss_type)]


def test_discopop_tau_is_read() -> None:
    for seed in SEEDS:
        loss, metrics, per_token, tokens, reference = run_trl(["discopop"], seed, beta=0.5, tau=0.7)
        out, leaf = ours(["discopop"], per_token, tokens, reference, beta=0.5, tau=0.7)
        assert_same(loss, metrics, per_token, out, leaf, seed)


@pytest.mark.parametrize("loss_types, weights", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO, TRL's docstring example
    (["sigmoid", "sft"], [1.0, 0.3]),  # RPO
    (["apo_zero", "nca_pair", "hinge"], None),
])
def test_lists_of_losses_with_weights_match(loss_types: list[str], weights: list[float] | None) -> None:
    for seed in SEEDS:
        loss, metrics, per_token, tokens, reference = run_trl(loss_types, seed, beta=0.3, weights=weights)
        out, leaf = ours(loss_types, per_token, tokens, reference, beta=0.3, weights=weights)
        assert_same(loss, metrics, per_token, out, leaf, (loss_types, seed))


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"])
def test_f_divergences_match(f: str, loss_type: str) -> None:
    label_smoothing = 1e-3 if loss_type == "exo_pair" else 0.1 if loss_type in SMOOTHED else 0.0
    for alpha in ([0.3, 1.0, 1.7] if f == "alpha_divergence" else [0.5]):
        for seed in SEEDS:
            loss, metrics, per_token, tokens, reference = run_trl([loss_type], seed, beta=0.5, label_smoothing=label_smoothing,
                                                                  f_divergence_type=f, alpha=alpha)
            out, leaf = ours([loss_type], per_token, tokens, reference, beta=0.5, label_smoothing=label_smoothing,
                             f_divergence_type=f, alpha=alpha)
            assert_same(loss, metrics, per_token, out, leaf, (f, alpha, loss_type, seed))


def test_trl_refuses_an_f_divergence_where_we_do() -> None:
    """TRL's own rule, read from its trainer's source, is the one check_settings keeps."""
    import inspect

    from trl.trainer.dpo_trainer import DPOTrainer

    from preftune.losses import F_DIVERGENCE_LOSSES

    source = inspect.getsource(DPOTrainer.__init__)
    line = next(x for x in source.splitlines() if "f_divergence_loss_types = {" in x)
    trl_set = set(eval(line.split("=", 1)[1].strip()))  # noqa: S307 - a literal set in TRL's source
    assert {canonical(name) for name in trl_set} == F_DIVERGENCE_LOSSES


def test_nll_alpha_is_trls_sft_term_when_chosen_lengths_are_equal() -> None:
    """TRL 1.16 has no rpo_alpha; RPO is loss_type [sigmoid, sft] with weights [1, alpha]. Its sft term is the
    token mean over the batch, ours (nll_alpha) the mean of each pair's token mean: the same when every chosen
    completion has the same length, and different otherwise."""
    from preftune.losses import PairLogps as P

    alpha = 0.4
    for seed in SEEDS:
        _, _, per_token, tokens, reference = run_trl(["sigmoid", "sft"], seed, weights=[1.0, alpha])
        policy, _ = ours_paired(per_token, tokens)
        same = P(policy.chosen, policy.rejected, torch.full_like(policy.chosen_tokens, 5), policy.rejected_tokens)
        listed = preference_loss(["dpo", "sft"], same, reference, weights=[1.0, alpha], beta=0.1).reduce()
        nll = preference_loss("dpo", same, reference, nll_alpha=alpha, beta=0.1).reduce()
        assert nll.item() == pytest.approx(listed.item(), rel=1e-12)
        if len(set(policy.chosen_tokens.tolist())) > 1:
            unequal = preference_loss(["dpo", "sft"], policy, reference, weights=[1.0, alpha], beta=0.1).reduce()
            assert preference_loss("dpo", policy, reference, nll_alpha=alpha, beta=0.1).reduce().item() != pytest.approx(unequal.item(), rel=1e-6)


class FakeLMWithSquares(FakeLM):
    """Also returns TRL's ``log_sum_sq_probs`` (log sum_v p_v^2 per position, 0 off the completion)."""

    def __init__(self, ids: torch.Tensor, log_probs: torch.Tensor, log_sum_sq: torch.Tensor) -> None:
        super().__init__((ids, log_probs))
        self.log_sum_sq = log_sum_sq

    def __call__(self, **kwargs: object) -> SimpleNamespace:
        out = super().__call__(**kwargs)
        out.log_sum_sq_probs = self.log_sum_sq
        return out


@pytest.mark.parametrize("loss_types", [["sigmoid"], ["ipo"], ["bco_pair", "nca_pair"], ["discopop"]])
def test_wpo_weighting_matches(loss_types: list[str]) -> None:
    """TRL 1.16 cannot weight its ``sft`` term (an in-place multiply of an expanded tensor raises), so lists with
    sft are compared without it; ours weights every term the same way."""
    from trl.trainer.dpo_trainer import DPOTrainer

    from preftune.losses import wpo_weights

    for seed in SEEDS:
        inputs, per_token, tokens, reference = dpo_batch(seed)
        gen = torch.Generator().manual_seed(300 + seed)
        # log sum p^2 lies in [2 log p_max, 0]; any values off the completion are masked by TRL and by us
        log_sum_sq = -(0.1 + 2 * torch.rand(per_token.shape, generator=gen, dtype=torch.float64)) * (per_token.detach() != 0)
        shim = trainer_shim(beta=0.2, loss_types=loss_types, loss_weights=[1.0] * len(loss_types), label_smoothing=0.0,
                            f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=True,
                            args=SimpleNamespace(discopop_tau=0.05))
        loss = DPOTrainer._compute_loss(shim, FakeLMWithSquares(inputs["input_ids"], per_token, log_sum_sq), inputs, False)
        loss.backward()
        metrics = {k: v[-1] for k, v in shim._metrics["train"].items()}
        policy, leaf = ours_paired(per_token, tokens)
        aligned_sums = (per_token.detach() - log_sum_sq).sum(dim=1)  # what preftune.logprobs.wpo_logps sums per row
        half = aligned_sums.shape[0] // 2
        weights = wpo_weights(PairLogps(aligned_sums[:half], aligned_sums[half:], tokens[:half], tokens[half:]))
        hparams = {"beta": 0.2} | ({"normalize": True} if "ipo" in loss_types else {})
        out = preference_loss(loss_types if len(loss_types) > 1 else loss_types[0], policy, reference, pair_weights=weights, **hparams)
        assert_same(loss, metrics, per_token, out, leaf, (loss_types, seed))


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_ld_alpha_matches(ld_alpha: float, loss_type: str) -> None:
    """TRL's ld_alpha on the policy's per-token log-probs (the reference is precomputed, as from our cache) against
    preftune's tail weights (logprobs.ld_token_weights, which the scorers apply in both layouts)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    from preftune.logprobs import ld_token_weights

    for seed in SEEDS:
        inputs, per_token, tokens, reference = dpo_batch(seed)
        shim = trainer_shim(beta=0.3, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=0.0, f_divergence_type="reverse_kl",
                            f_alpha_divergence_coef=0.5, ld_alpha=ld_alpha, use_weighting=False)
        loss = DPOTrainer._compute_loss(shim, FakeLM((inputs["input_ids"], per_token)), inputs, False)
        loss.backward()
        leaf = per_token.detach().clone().requires_grad_()
        sums = (leaf * ld_token_weights(inputs["completion_mask"][:, 1:].bool(), ld_alpha)).sum(dim=1)
        half = sums.shape[0] // 2
        policy = PairLogps(sums[:half], sums[half:], tokens[:half], tokens[half:])
        out = preference_loss(canonical(loss_type), policy, reference, beta=0.3, **({"normalize": True} if loss_type == "ipo" else {}))
        total = out.reduce()
        assert total.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-9), seed
        total.backward()
        scored = per_token.detach() != 0  # TRL's masks reach only the completion; ours weighs the rest 0
        assert torch.allclose(leaf.grad[scored], per_token.grad[scored], rtol=1e-6, atol=1e-9), seed


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.1)])
def test_cpo_matches_trls_cpo_trainer(beta: float, eps: float) -> None:
    """TRL's CPOTrainer.cpo_loss (loss_type sigmoid, AlphaPO's alpha 0) on the same summed log-probs. Its cpo_alpha NLL
    term is our [cpo, sft] list with weights [1, cpo_alpha] (sft's token mean is checked against DPOTrainer above)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    from preftune.losses import cpo

    for seed in SEEDS:
        _, per_token, tokens, _ = dpo_batch(seed)
        policy, _ = ours_paired(per_token, tokens)
        shim = trainer_shim(beta=beta, label_smoothing=eps, loss_type="sigmoid", alpha=0.0)
        trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(shim, policy.chosen.detach(), policy.rejected.detach())
        out = cpo(policy, None, beta=beta, label_smoothing=eps)
        assert torch.allclose(out.losses.detach(), trl_losses, rtol=1e-6, atol=1e-9), seed
        assert torch.allclose(out.chosen_rewards, trl_chosen, rtol=1e-9) and torch.allclose(out.rejected_rewards, trl_rejected, rtol=1e-9)
