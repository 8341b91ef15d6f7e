"""eval/metrics.py and eval/run.py: the alignment check, perplexity, the KL estimate, and `run_eval` on a run.

The win-rate judges (eval/judges.py) are tested in test_judges.py.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_judges_module
from preftune.errors import PreftuneError
from preftune.eval.metrics import kl_to_reference, perplexity, preference_metrics
from preftune.eval.run import EvalSettings, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def reference(tokenizer):  # noqa: ANN001, ANN201
    from test_generate import sharpened

    return sharpened(tokenizer)


def perturb(model, scale: float):  # noqa: ANN001, ANN201
    """A copy with seeded noise on every weight: a different model, close to the original."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def perturbed(reference):  # noqa: ANN001, ANN201
    return perturb(reference, 0.05)


@pytest.fixture(scope="module")
def pairs(tokenizer):  # noqa: ANN001, ANN201
    from preftune.data import PreferenceExample, tokenize_pairs
    from preftune.models.tiny import synthetic_preferences

    examples = [PreferenceExample(**r) for r in synthetic_preferences(12, seed=6)]
    return tokenize_pairs(examples, tokenizer, max_length=64)


@pytest.fixture
def judges_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The judge functions of conftest.JUDGES, importable as ``my_judges``."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_judges_module(tmp_path)


def logits_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:  # noqa: ANN001
    """log p(completion | prompt) from the model's full logits: an independent computation."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    picked = logp.gather(1, ids[0, 1:, None]).squeeze(1)
    return float(picked[len(prompt_ids) - 1 :].sum())


# --------------------------------------------------------------------------- preference metrics
def test_a_policy_that_is_its_reference_changes_nothing_exactly(reference, tokenizer, pairs) -> None:  # noqa: ANN001
    out = preference_metrics(reference, reference, tokenizer, pairs, beta=0.1, batch_size=5)
    assert out["pairs"] == len(pairs)
    assert out["alignment/differences"] == [0.0] * len(pairs)
    assert out["alignment/improved"] == 0.0 and out["alignment/unchanged"] == 1.0
    assert out["rewards/margins"] == 0.0 and out["rewards/chosen"] == 0.0 and out["rewards/accuracies"] == 0.0
    assert out["perplexity/chosen"] == out["reference/perplexity/chosen"]
    # a second copy of the same weights, scored in other batches, is the same model too
    twin = copy.deepcopy(reference)
    assert preference_metrics(twin, reference, tokenizer, pairs, beta=0.1, batch_size=12)["alignment/unchanged"] == 1.0


def test_preference_metrics_match_log_probs_computed_from_logits(perturbed, reference, tokenizer, pairs) -> None:  # noqa: ANN001
    beta = 0.2
    out = preference_metrics(perturbed, reference, tokenizer, pairs, beta=beta, batch_size=4)
    expected = []
    for p in pairs:
        policy_ratio = logits_logp(perturbed, p.prompt_ids, p.chosen_ids) - logits_logp(perturbed, p.prompt_ids, p.rejected_ids)
        reference_ratio = logits_logp(reference, p.prompt_ids, p.chosen_ids) - logits_logp(reference, p.prompt_ids, p.rejected_ids)
        expected.append(policy_ratio - reference_ratio)
    assert out["alignment/differences"] == pytest.approx(expected, abs=1e-3)
    assert any(d > 0 for d in expected) and any(d < 0 for d in expected)  # a mixed case, so the counts mean something
    assert out["alignment/improved"] == pytest.approx(sum(d > 0 for d in expected) / len(pairs))
    # the implicit reward margin is beta times the log-ratio gain, pair by pair
    assert out["rewards/margins"] == pytest.approx(beta * sum(expected) / len(pairs), abs=1e-3)
    assert out["rewards/accuracies"] == out["alignment/improved"]
    ordered = sorted(out["alignment/differences"])
    assert out["alignment/quantiles"]["min"] == ordered[0] and out["alignment/quantiles"]["max"] == ordered[-1]
    assert ordered[0] <= out["alignment/quantiles"]["p25"] <= out["alignment/quantiles"]["p50"] <= out["alignment/quantiles"]["p75"]


# --------------------------------------------------------------------------- perplexity
def test_perplexity_is_token_weighted_and_skips_bos(reference, tokenizer) -> None:  # noqa: ANN001
    texts = ["the a of to and", "good great fine nice happy kind bright warm calm"]
    total, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        with torch.no_grad():  # transformers' own loss: mean over positions 1.., so BOS is not scored
            loss = reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss
        total += float(loss) * (len(ids) - 1)
        tokens += len(ids) - 1
    assert perplexity(reference, tokenizer, texts, batch_size=2) == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert perplexity(reference, tokenizer, texts[:1], max_length=3) == pytest.approx(
        math.exp(-logits_logp(reference, tokenizer(texts[0])["input_ids"][:1], tokenizer(texts[0])["input_ids"][1:3]) / 2), rel=1e-4)


# --------------------------------------------------------------------------- KL
def test_kl_of_the_reference_to_itself_is_zero_and_to_another_model_positive(reference, perturbed, tokenizer) -> None:  # noqa: ANN001
    prompts = ["the a of", "to and in is it", "be an"]
    same = kl_to_reference(reference, reference, tokenizer, prompts, num_samples=4, max_new_tokens=8, seed=0)
    assert same["mean"] == 0.0 and same["stderr"] == 0.0 and same["per_sample"] == [0.0] * 12 and same["n"] == 12
    other = kl_to_reference(perturbed, reference, tokenizer, prompts, num_samples=4, max_new_tokens=8, seed=0)
    assert other["mean"] > 3 * other["stderr"] > 0, other
    assert other["mean_tokens"] > 1


def test_kl_estimate_is_unbiased_against_the_exact_one_token_kl(tokenizer) -> None:  # noqa: ANN001
    # With one new token the sequence KL is the next-token KL, computable exactly from the logits.
    # Random (unsharpened) weights spread the policy over the whole vocabulary, so any filter left
    # on while sampling (transformers' default top_k=50) would bias the estimate visibly.
    from preftune.data.tokenize import encode_prompt
    from preftune.models.tiny import tiny_llama

    reference = tiny_llama(tokenizer, seed=0).eval()
    perturbed = perturb(reference, 0.05)

    prompts = ["the a of", "to and in is it"]
    estimate = kl_to_reference(perturbed, reference, tokenizer, prompts, num_samples=300, max_new_tokens=1, seed=4, batch_size=2)
    exact = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.no_grad():
            p = torch.log_softmax(perturbed(ids).logits[0, -1].double(), -1)
            q = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
        exact.append(float((p.exp() * (p - q)).sum()))
    truth = sum(exact) / len(exact)
    assert abs(estimate["mean"] - truth) < 4 * estimate["stderr"], (estimate["mean"], estimate["stderr"], truth)
    assert estimate["stderr"] < truth / 3  # tight enough that the comparison above has teeth


# --------------------------------------------------------------------------- run_eval on a real run
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, preference_files: tuple[Path, Path]) -> Path:
    from preftune.config.schema import DPOConfig, load_config
    from preftune.stages.dpo import run as run_dpo

    train, held = preference_files
    out = tmp_path_factory.mktemp("eval-run") / "run"
    cfg = load_config(DPOConfig, REPO / "configs" / "dpo-tiny.yaml", [
        f"--model.path={tiny_model_dir}", f"--data.train={train}", f"--data.eval={held}", f"--train.output_dir={out}",
        "--train.progress=false", "--train.max_steps=8", "--train.log_every=2", "--train.eval_every=4", "--train.save_every=4"])
    return run_dpo(cfg)


def final_eval_line(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval/rewards/margins" in m][-1]


def test_run_eval_on_a_run_folder_saves_every_metric(dpo_run: Path, judges_module: Path, tmp_path: Path) -> None:
    from preftune.report.html import format_table

    texts = tmp_path / "held.txt"
    texts.write_text("the a of to and\ngood great fine nice\n", encoding="utf-8")
    results = run_eval(EvalSettings(policy=str(dpo_run), judge="my_judges:longer", texts=[str(texts)],
                                    max_prompts=6, num_samples=2, max_new_tokens=8))
    saved = json.loads((dpo_run / "eval.json").read_text())
    assert saved["checkpoint"] == "final" and saved["step"] == 8 and results["path"] == str(dpo_run / "eval.json")
    pref = saved["preference"]
    assert pref["pairs"] == 32 and saved["data"]["from"] == "the run's data.eval"
    # the very metric the training loop logged at its last evaluation, recomputed from the saved model
    assert pref["rewards/margins"] == pytest.approx(final_eval_line(dpo_run)["eval/rewards/margins"], abs=1e-4)
    assert pref["alignment/improved"] >= 0.75  # the policy learned the rule
    assert set(saved["perplexity"]) == {"policy", "reference"} and saved["perplexity"]["policy"]["texts"] == 2
    assert saved["kl"]["n"] == 12 and saved["kl"]["prompts"] == 6 and saved["kl"]["stderr"] is not None
    assert saved["win_rate"][0]["n"] == 12 and saved["win_rate"][0]["judge"] == "function my_judges:longer"
    assert len(saved["samples"]) == 5 and saved["samples"][0]["reference"] is not None
    table = format_table(results)
    for needle in ("reward accuracy", "KL per completion", "win rate, ties count half", "95% Wilson interval", "Perplexity (2 held-out texts"):
        assert needle in table, needle


def test_run_eval_of_a_checkpoint_and_of_a_plain_model(dpo_run: Path, tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                      judges_module: Path, tmp_path: Path) -> None:
    results = run_eval(EvalSettings(policy=str(dpo_run / "checkpoints" / "step-4"), max_prompts=4, max_new_tokens=6))
    assert results["checkpoint"] == "step-4" and results["step"] == 4
    assert (dpo_run / "eval-step-4.json").is_file()
    # its weights are step 4's: the training loop's eval at step 4 gave the same margin
    lines = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    at_4 = next(m for m in lines if m["step"] == 4 and "eval/rewards/margins" in m)
    assert results["preference"]["rewards/margins"] == pytest.approx(at_4["eval/rewards/margins"], abs=1e-4)

    with pytest.raises(PreftuneError, match="no recorded reference"):
        run_eval(EvalSettings(policy=str(tiny_model_dir)))
    with pytest.raises(PreftuneError, match="Give an output folder"):
        run_eval(EvalSettings(policy=str(tiny_model_dir), reference=str(tiny_model_dir)))
    # a model against itself, loaded twice, from files: exactly no change and no KL
    same = run_eval(EvalSettings(policy=str(tiny_model_dir), reference=str(tiny_model_dir), out=str(tmp_path),
                                 pairs=[str(preference_files[1])], max_pairs=8, max_prompts=3, max_new_tokens=6,
                                 judge="my_judges:tie"))
    assert same["preference"]["alignment/unchanged"] == 1.0 and same["preference"]["pairs"] == 8
    assert same["kl"]["mean"] == 0.0 and same["kl"]["n"] == 6
    # reference samples are drawn independently of the policy's (another seed), as a win rate assumes
    assert any(s["policy"] != s["reference"] for s in same["samples"])
    assert (tmp_path / "eval.json").is_file()


def test_run_eval_remakes_the_eval_fraction_split(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from preftune.config.schema import DPOConfig, load_config
    from preftune.stages.dpo import run as run_dpo

    train, _ = preference_files
    cfg = load_config(DPOConfig, REPO / "configs" / "dpo-tiny.yaml", [
        f"--model.path={tiny_model_dir}", f"--data.train={train}", "--data.eval=[]", "--data.eval_fraction=0.25",
        f"--train.output_dir={tmp_path / 'run'}", "--train.progress=false", "--train.max_steps=3", "--train.eval_every=null",
        "--train.save_every=null", "--train.log_every=1"])
    run = run_dpo(cfg)
    results = run_eval(EvalSettings(policy=str(run), max_prompts=0))
    assert results["preference"]["pairs"] == 16 and "eval_fraction" in results["data"]["from"]
    assert results["preference"]["rewards/margins"] == pytest.approx(final_eval_line(run)["eval/rewards/margins"], abs=1e-4)


@pytest.mark.fp32_exact
def test_run_eval_of_a_lora_run_and_its_checkpoint(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from preftune.config.schema import DPOConfig, load_config
    from preftune.stages.dpo import run as run_dpo

    train, held = preference_files
    cfg = load_config(DPOConfig, REPO / "configs" / "dpo-tiny.yaml", [
        f"--model.path={tiny_model_dir}", f"--data.train={train}", f"--data.eval={held}", "--model.lora.enabled=true",
        "--model.lora.r=4", "--reference.strategy=auto", "--train.lr=1e-2", f"--train.output_dir={tmp_path / 'run'}",
        "--train.progress=false", "--train.max_steps=4", "--train.eval_every=2", "--train.save_every=2", "--train.log_every=2"])
    run = run_dpo(cfg)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for policy, step in ((run, 4), (run / "checkpoints" / "step-2", 2)):
        results = run_eval(EvalSettings(policy=str(policy), max_prompts=2, max_new_tokens=4))
        logged = [m for m in lines if m["step"] == step and "eval/rewards/margins" in m][-1]
        assert results["step"] == step and results["reference"] == str(tiny_model_dir)
        assert abs(logged["eval/rewards/margins"]) > 1e-3  # the adapters moved the policy
        assert results["preference"]["rewards/margins"] == pytest.approx(logged["eval/rewards/margins"], abs=1e-4)
