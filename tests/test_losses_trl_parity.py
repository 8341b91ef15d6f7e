"""Parity with TRL 1.16.0: the same log-probs through TRL's own loss code and through ours.

TRL's DPO and KTO losses live inline in ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss``;
building a trainer needs a model, a dataset and a tokenizer, so those methods are called unbound
on a small stand-in ``self`` that holds only the attributes they read, with a fake model that
returns chosen per-token log-probs (what TRL's fused LM head gives: 0 off the completion).
ORPO's ``odds_ratio_loss`` and CPO's ``cpo_loss`` (which holds SimPO) are plain methods on
per-sequence log-probs and are called the same way.

Differences from TRL 1.16, by design, each pinned by a test below:
- ``ipo``: TRL's IPO divides each log-ratio by the completion length (per-token form, which TRL
  says the IPO authors confirmed); ours defaults to the paper's eq. 17 on summed log-probs and
  gives TRL's form with ``normalize=True``.
- ``dpo`` + ``label_smoothing``: TRL 1.16's ``sigmoid`` loss ignores ``label_smoothing`` (it is only
  read by ``robust``, ``exo_pair`` and ``aot``), so conservative DPO is not in its DPOTrainer. The
  same formula is CPOTrainer's ``sigmoid`` loss with label smoothing, which is compared instead.
- ``orpo``: TRL's ``beta`` is the paper's lambda; the NLL term in TRL is the chosen rows' token
  mean over the whole batch *including prompt tokens*, ours is each example's completion-token
  mean: only the odds-ratio term, the log-odds and the rewards are compared.
- ``simpo``: in TRL it is CPOTrainer with ``loss_type="simpo"``, whose default ``cpo_alpha=1.0``
  still adds an NLL term (pure SimPO needs ``cpo_alpha=0``); ours adds one only with ``nll_alpha``.
  TRL's SimPO also takes ``label_smoothing``; ours has no smoothed SimPO.
- soft preference labels (``preference=``) have no TRL counterpart.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from preftune.losses import LOSSES, PairLogps, UnpairedLogps, dpo, kto, orpo, simpo  # noqa: E402

SEEDS = range(4)
IGNORE = -100


class IdentityAccelerator:
    """One process: gathering is the identity."""

    device = torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class FakeLM:
    """Stands in for a model called with ``fused_lm_head=True``: per-token log-probs of the labels."""

    def __init__(self, *batches: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.batches = batches  # (input_ids, per-token log-probs (rows, length - 1))

    def __call__(self, *, input_ids: torch.Tensor, labels: torch.Tensor, fused_lm_head: bool, **_: object) -> SimpleNamespace:
        assert fused_lm_head
        for ids, log_probs in self.batches:
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                # TRL scores exactly the positions we score: labels[:, 1:] != -100
                assert torch.equal(labels[:, 1:] != IGNORE, log_probs.detach() != 0)
                zeros = torch.zeros(log_probs.shape, dtype=torch.float64)
                return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
        raise AssertionError("the fake model was called with input_ids it does not know")


def trainer_shim(**attrs: object) -> SimpleNamespace:
    base = dict(
        model=SimpleNamespace(training=True),
        accelerator=IdentityAccelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    return SimpleNamespace(**(base | attrs))


def random_rows(gen: torch.Generator, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, completion_mask (prompt >= 1 token, right padding) and
    per-token log-probs that are 0 off the completion."""
    input_ids = torch.randint(3, 50, (rows, length), generator=gen)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    completion_mask = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        prompt = int(torch.randint(1, 4, (), generator=gen))
        completion = int(torch.randint(1, length - prompt + 1, (), generator=gen))
        attention_mask[row, : prompt + completion] = 1
        completion_mask[row, prompt : prompt + completion] = 1
    per_token = -(0.05 + 3 * torch.rand(rows, length - 1, generator=gen, dtype=torch.float64)) * completion_mask[:, 1:]
    return input_ids, attention_mask, completion_mask, per_token.requires_grad_()


def ours_tokens(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Our collator's convention: labels aligned with input_ids, -100 off the completion, scored from 1."""
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE)
    return (labels[:, 1:] != IGNORE).sum(dim=1)


def dpo_batch(seed: int, pairs: int = 5, length: int = 12) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, PairLogps]:
    """TRL's inputs (precomputed reference log-probs), the policy's per-token log-probs (a leaf),
    our token counts, and our reference PairLogps."""
    gen = torch.Generator().manual_seed(seed)
    input_ids, attention_mask, completion_mask, per_token = random_rows(gen, 2 * pairs, length)
    sums = per_token.detach().sum(dim=1)
    # reference log-probs near the policy's, so h takes both signs
    ref = sums + 2.0 * torch.randn(2 * pairs, generator=gen, dtype=torch.float64)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:pairs],
        "ref_rejected_logps": ref[pairs:],
    }
    tokens = ours_tokens(input_ids, completion_mask)
    reference = PairLogps(ref[:pairs], ref[pairs:], tokens[:pairs], tokens[pairs:])
    return inputs, per_token, tokens, reference


def run_trl_dpo(
    loss_type: str, beta: float, label_smoothing: float, seed: int
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor, PairLogps]:
    """TRL's batch loss (backpropagated into the per-token log-probs) and its logged metrics."""
    from trl.trainer.dpo_trainer import DPOTrainer

    inputs, per_token, tokens, reference = dpo_batch(seed)
    shim = trainer_shim(
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False,
    )
    loss = DPOTrainer._compute_loss(shim, FakeLM((inputs["input_ids"], per_token)), inputs, False)
    loss.backward()
    return loss, {k: v[-1] for k, v in shim._metrics["train"].items()}, per_token, tokens, reference


def ours_paired(per_token: torch.Tensor, tokens: torch.Tensor) -> tuple[PairLogps, torch.Tensor]:
    leaf = per_token.detach().clone().requires_grad_()
    sums = leaf.sum(dim=1)
    half = sums.shape[0] // 2
    return PairLogps(sums[:half], sums[half:], tokens[:half], tokens[half:]), leaf


@pytest.mark.parametrize(
    "trl_name, ours, hparams, label_smoothing",
    [
        ("sigmoid", "dpo", {}, 0.0),
        ("hinge", "hinge", {}, 0.0),
        ("ipo", "ipo", {"normalize": True}, 0.0),
        ("robust", "robust", {"label_smoothing": 0.1}, 0.1),
    ],
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_family_matches_trl(trl_name: str, ours: str, hparams: dict, label_smoothing: float, beta: float) -> None:
    for seed in SEEDS:
        loss, metrics, per_token, tokens, reference = run_trl_dpo(trl_name, beta, label_smoothing, seed)
        policy, leaf = ours_paired(per_token, tokens)
        out = LOSSES[ours](policy, reference, beta=beta, **hparams)
        total = out.reduce()
        assert total.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-5), (seed, trl_name)
        assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-5, abs=1e-5)
        assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-5, abs=1e-5)
        margins = (out.chosen_rewards - out.rejected_rewards).mean().item()
        assert margins == pytest.approx(metrics["rewards/margins"], rel=1e-5, abs=1e-5)
        accuracy = (out.chosen_rewards > out.rejected_rewards).double().mean().item()
        assert accuracy == pytest.approx(metrics["rewards/accuracies"])
        assert policy.chosen.mean().item() == pytest.approx(metrics["logps/chosen"], rel=1e-9)
        total.backward()  # the same gradient reaches every completion token
        assert torch.allclose(leaf.grad, per_token.grad, rtol=1e-5, atol=1e-8), (seed, trl_name)


def test_trl_ipo_is_the_per_token_form_not_the_papers_sum() -> None:
    loss, _, per_token, tokens, reference = run_trl_dpo("ipo", 0.1, 0.0, seed=0)
    policy, _ = ours_paired(per_token, tokens)
    summed = LOSSES["ipo"](policy, reference, beta=0.1).reduce().item()
    assert summed != pytest.approx(loss.item(), rel=1e-2)


def test_trl_sigmoid_ignores_label_smoothing_and_cdpo_matches_cpo() -> None:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    beta, eps = 0.5, 0.1
    for seed in SEEDS:
        loss, _, per_token, tokens, reference = run_trl_dpo("sigmoid", beta, eps, seed)
        policy, _ = ours_paired(per_token, tokens)
        assert dpo(policy, reference, beta=beta).reduce().item() == pytest.approx(loss.item(), rel=1e-6)
        smoothed = dpo(policy, reference, beta=beta, label_smoothing=eps)
        assert smoothed.reduce().item() != pytest.approx(loss.item(), rel=1e-3)
        # conservative DPO is CPO's smoothed sigmoid loss applied to the log-ratios instead of the log-probs
        shim = trainer_shim(beta=beta, label_smoothing=eps, loss_type="sigmoid", alpha=0.0)
        chosen_ratio, rejected_ratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        trl_losses, _, _ = CPOTrainer.cpo_loss(shim, chosen_ratio.detach(), rejected_ratio.detach())
        assert torch.allclose(smoothed.losses.detach(), trl_losses, rtol=1e-6, atol=1e-9)


def kto_batch(
    seed: int, rows: int = 8, length: int = 11, negative_kl: bool = False
) -> tuple[dict[str, torch.Tensor], FakeLM, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's KTO batch (with mismatched KL rows, precomputed reference), the fake model, the
    per-token log-probs of the completions (a leaf) and of the KL rows, and our token counts."""
    gen = torch.Generator().manual_seed(100 + seed)
    input_ids, attention_mask, completion_mask, per_token = random_rows(gen, rows, length)
    kl_ids, kl_attention, kl_completion, kl_per_token = random_rows(gen, rows, length + 2)
    kl_per_token = kl_per_token.detach()
    desirable = torch.arange(rows) % 3 != 1  # mixed, and unbalanced
    ref = per_token.detach().sum(1) + torch.randn(rows, generator=gen, dtype=torch.float64)
    ref_kl = kl_per_token.sum(1) + (1.0 if negative_kl else -0.3) + 0.2 * torch.randn(rows, generator=gen, dtype=torch.float64)
    batch = {
        "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
        "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion,
        "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl,
    }
    model = FakeLM((input_ids, per_token), (kl_ids, kl_per_token))
    tokens = ours_tokens(input_ids, completion_mask)
    return batch, model, per_token, kl_per_token, tokens


@pytest.mark.parametrize("beta, desirable_weight, undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (0.3, 0.75, 1.0)])
@pytest.mark.parametrize("negative_kl", [False, True])
def test_kto_matches_trl(beta: float, desirable_weight: float, undesirable_weight: float, negative_kl: bool) -> None:
    from trl.trainer.kto_trainer import KTOTrainer

    class KTOShim(SimpleNamespace):
        _compute_kl_logps = KTOTrainer._compute_kl_logps

    for seed in SEEDS:
        batch, model, per_token, kl_per_token, tokens = kto_batch(seed, negative_kl=negative_kl)
        shim = KTOShim(**vars(trainer_shim(
            beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
            calculate_KL=True, loss_type="kto",
        )))
        loss = KTOTrainer._compute_loss(shim, model, batch, False)
        loss.backward()
        metrics = {k: v[-1] for k, v in shim._metrics["train"].items()}

        leaf = per_token.detach().clone().requires_grad_()
        desirable = batch["label"]
        policy = UnpairedLogps(leaf.sum(1), tokens, desirable, kl_per_token.sum(1))
        reference = UnpairedLogps(batch["ref_logps"], tokens, desirable, batch["ref_KL_logps"])
        out = kto(policy, reference, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        total = out.reduce()
        assert total.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6), seed
        assert out.metrics["kl"][0].item() == pytest.approx(metrics["kl"], abs=1e-9)
        if negative_kl:
            assert metrics["kl"] == 0.0
        else:
            assert metrics["kl"] > 0
        assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-5)
        assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-5)
        margins = out.chosen_rewards.mean() - out.rejected_rewards.mean()
        assert margins.item() == pytest.approx(metrics["rewards/margins"], rel=1e-5, abs=1e-9)
        total.backward()
        assert torch.allclose(leaf.grad, per_token.grad, rtol=1e-5, atol=1e-9), seed


def mean_logps(seed: int, pairs: int = 6) -> tuple[PairLogps, torch.Tensor, torch.Tensor]:
    """Summed log-probs with their token counts, and TRL's inputs: the per-token means."""
    gen = torch.Generator().manual_seed(200 + seed)
    tokens = torch.randint(1, 12, (2, pairs), generator=gen)
    # per-token means from -4 to -0.005: both branches of log(1 - p) are used
    means = -torch.exp(torch.empty(2, pairs, dtype=torch.float64).uniform_(-5.3, 1.4, generator=gen))
    sums = means * tokens
    return PairLogps(sums[0], sums[1], tokens[0], tokens[1]), means[0], means[1]


@pytest.mark.parametrize("lambda_", [0.1, 0.5])
def test_orpo_odds_ratio_matches_trl(lambda_: float) -> None:
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    for seed in SEEDS:
        policy, chosen_mean, rejected_mean = mean_logps(seed)
        shim = trainer_shim(beta=lambda_)  # TRL's ORPO beta is the paper's lambda
        trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(shim, chosen_mean, rejected_mean)
        out = orpo(policy, None, beta=lambda_, lambda_=lambda_)
        # TRL's per-example term is lambda * log sigmoid(log odds ratio): ours is losses = nll - that
        odds_term = out.metrics["nll_loss"] - out.losses.detach()
        assert torch.allclose(odds_term, trl_losses.double(), rtol=1e-5, atol=1e-6), seed
        assert out.metrics["log_odds_ratio"].mean().item() == pytest.approx(trl_ratio.item(), rel=1e-5, abs=1e-6)
        assert out.metrics["log_odds_chosen"].mean().item() == pytest.approx(trl_log_odds.item(), rel=1e-5, abs=1e-5)
        assert torch.allclose(out.chosen_rewards, trl_chosen.double(), rtol=1e-5)
        assert torch.allclose(out.rejected_rewards, trl_rejected.double(), rtol=1e-5)


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.4), (10.0, 0.0)])
def test_simpo_matches_trl_cpo(beta: float, gamma: float) -> None:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    for seed in SEEDS:
        policy, chosen_mean, rejected_mean = mean_logps(seed)
        shim = trainer_shim(beta=beta, simpo_gamma=gamma, loss_type="simpo", alpha=0.0, label_smoothing=0.0)
        trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(shim, chosen_mean, rejected_mean)
        out = simpo(policy, None, beta=beta, gamma=gamma)
        assert torch.allclose(out.losses, trl_losses, rtol=1e-6, atol=1e-9), seed
        assert torch.allclose(out.chosen_rewards, trl_chosen, rtol=1e-9)
        assert torch.allclose(out.rejected_rewards, trl_rejected, rtol=1e-9)
