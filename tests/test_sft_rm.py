"""SFT, reward model and scoring: learning, exactness of packing and pooling, save/load, CLI."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, write_jsonl
from preftune.config.schema import RMConfig, SFTConfig, load_config
from preftune.errors import PreftuneError

CONFIGS = REPO / "configs"


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def sft_cfg(model: Path, train: Path, held: Path | None, out: Path, *overrides: str) -> SFTConfig:
    base = [f"--model.path={model}", f"--data.train={train}", f"--train.output_dir={out}", "--train.progress=false",
            "--train.report=false",
            f"--data.eval={held}" if held else "--data.eval=[]"]
    return load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", base + list(overrides))


def rm_cfg(model: Path, train: Path, held: Path | None, out: Path, *overrides: str) -> RMConfig:
    base = [f"--model.path={model}", f"--data.train={train}", f"--train.output_dir={out}", "--train.progress=false",
            "--train.report=false",
            f"--data.eval={held}" if held else "--data.eval=[]"]
    return load_config(RMConfig, CONFIGS / "rm-tiny.yaml", base + list(overrides))


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preftune.stages.rm import run as run_rm

    train, held = preference_files
    return run_rm(rm_cfg(tiny_model_dir, train, held, tmp_path_factory.mktemp("rm") / "run"))


# --------------------------------------------------------------------------- SFT
def test_sft_learns_the_completions_and_saves_a_loadable_model(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from preftune.stages.sft import run as run_sft

    train, held = preference_files
    run = run_sft(sft_cfg(tiny_model_dir, train, held, tmp_path / "sft"))
    evals = [m for m in metrics_of(run) if "eval/loss" in m]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.5, evals
    # TRL's SFT metrics: token means of the next-token entropy (learning lowers it) and of top-1 accuracy
    # (their values against the full logits: tests/test_logprobs.py)
    assert all(0 <= m["eval/mean_token_accuracy"] <= 1 for m in evals)
    assert evals[-1]["eval/entropy"] < evals[0]["eval/entropy"] <= math.log(300) + 1e-3  # at most log(vocab)
    assert {"entropy", "mean_token_accuracy"} <= set(next(m for m in metrics_of(run) if "loss" in m))
    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    assert model.config.architectures == ["LlamaForCausalLM"]
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["kept"] == 64


def test_sft_on_chat_messages_and_prompt_completion_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    from preftune.stages.sft import run as run_sft

    chats = [{"messages": [{"role": "user", "content": f"say good {i}"}, {"role": "assistant", "content": "good good"}]}
             for i in range(8)]
    pc = [{"prompt": f"say good {i}", "completion": "good good"} for i in range(8)]
    for name, records, packing in (("chat", chats, "false"), ("pc", pc, "true")):
        data = write_jsonl(tmp_path / f"{name}.jsonl", records)
        run = run_sft(sft_cfg(tiny_model_dir, data, None, tmp_path / name, "--train.max_steps=3", "--train.eval_every=null",
                              f"--sft.packing={packing}"))
        assert (run / "final" / "model.safetensors").is_file()
        assert json.loads((run / "data_report.json").read_text())["train"]["format"] == {"chat": "messages", "pc": "completion"}[name]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(PreftuneError, match=r"bad.jsonl, line 1.*messages\[0\].*assistant"):
        run_sft(sft_cfg(tiny_model_dir, bad, None, tmp_path / "bad"))


def test_packing_gives_exactly_the_unpacked_loss(tiny_model_dir: Path, preference_files: tuple[Path, Path]) -> None:
    from preftune.config.schema import ModelConfig
    from preftune.data import load_examples
    from preftune.data.collate import collate_packed, collate_unpaired, pack
    from preftune.data.prepare import as_demonstrations
    from preftune.data.tokenize import tokenize_unpaired
    from preftune.models.load import load_causal_lm
    from preftune.models.scorers import SequenceLogpsWithStats
    from preftune.models.tokenizer import load_tokenizer
    from preftune.stages.sft import count_tokens, sft_loss

    tokenizer = load_tokenizer(str(tiny_model_dir))
    result = load_examples(preference_files[0], max_records=12)
    items = tokenize_unpaired(as_demonstrations(result.examples, result.report), tokenizer, max_length=128)
    packs = pack(items, 128)
    assert len(packs) < len(items)  # something was packed
    assert sorted(x.index for row in packs for x in row) == sorted(x.index for x in items)  # nothing lost
    scorer = SequenceLogpsWithStats(load_causal_lm(ModelConfig(path=str(tiny_model_dir))), chunk_size=5)
    plain_batch, packed_batch = collate_unpaired(items, tokenizer.pad_token_id), collate_packed(packs, tokenizer.pad_token_id)
    plain, plain_metrics = sft_loss(scorer, plain_batch, count_tokens(plain_batch))
    packed, packed_metrics = sft_loss(scorer, packed_batch, count_tokens(packed_batch))
    assert float(packed.detach()) == pytest.approx(float(plain.detach()), abs=1e-5)
    for name in ("entropy", "mean_token_accuracy"):  # token means: the same however rows are packed
        assert float(packed_metrics[name].mean()) == pytest.approx(float(plain_metrics[name].mean()), abs=1e-5)
    grads = []
    for batch in (collate_unpaired(items, tokenizer.pad_token_id), collate_packed(packs, tokenizer.pad_token_id)):
        scorer.zero_grad()
        sft_loss(scorer, batch, count_tokens(batch))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in scorer.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- reward model
def test_reward_model_ranks_held_out_pairs_far_above_chance(trained_rm: Path) -> None:
    evals = [m for m in metrics_of(trained_rm) if "eval/accuracy" in m]
    assert evals[-1]["eval/accuracy"] >= 0.9, evals
    train_lines = [m for m in metrics_of(trained_rm) if "rm_loss" in m]
    for key in ("loss", "rm_loss", "lm_loss", "accuracy", "margin"):
        assert key in train_lines[0], key
    # loss = rm_loss + 1.0 * lm_loss, per logged window
    line = train_lines[-1]
    assert line["loss"] == pytest.approx(line["rm_loss"] + line["lm_loss"], rel=0.05)


def test_lm_weight_keeps_the_language_model(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from preftune.stages.rm import run as run_rm

    train, held = preference_files
    final_lm = {}
    for weight in (0.0, 1.0):
        run = run_rm(rm_cfg(tiny_model_dir, train, held, tmp_path / f"w{weight}", f"--loss.lm_weight={weight}",
                            "--train.max_steps=20", "--train.eval_every=null"))
        final_lm[weight] = [m for m in metrics_of(run) if "eval/lm_loss" in m][-1]["eval/lm_loss"]
    # trained with the LM term, the backbone predicts chosen completions far better than without it
    assert final_lm[1.0] < final_lm[0.0] - 0.5, final_lm


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(trained_rm: Path) -> None:
    from preftune.models.reward import load_reward_model

    model, tokenizer = load_reward_model(trained_rm / "final")
    short = tokenizer("the cat sat")["input_ids"]
    long = tokenizer("the cat sat on the mat and then it sat again")["input_ids"]
    pad = tokenizer.pad_token_id
    alone = model(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))[0]
    n = len(long) - len(short) + 3
    right = torch.tensor([short + [pad] * n])
    left = torch.tensor([[pad] * n + short])
    mask_right = torch.tensor([[1] * len(short) + [0] * n])
    mask_left = torch.tensor([[0] * n + [1] * len(short)])
    for ids, mask in ((right, mask_right), (left, mask_left)):
        batch_ids = torch.cat([ids, torch.tensor([long + [pad] * (ids.shape[1] - len(long))])])
        batch_mask = torch.cat([mask, torch.tensor([[1] * len(long) + [0] * (ids.shape[1] - len(long))])])
        rewards = model(batch_ids, batch_mask)[0]
        assert float(rewards[0].detach()) == pytest.approx(float(alone[0].detach()), abs=1e-5)


@pytest.mark.fp32_exact
def test_save_load_score_round_trip_and_batch_size_invariance(trained_rm: Path, preference_files: tuple[Path, Path]) -> None:
    from transformers import AutoModelForSequenceClassification

    from preftune.stages.score import score_file

    records, summary = score_file(trained_rm / "final", [str(preference_files[1])], batch_size=7)
    again, _ = score_file(trained_rm / "final", [str(preference_files[1])], batch_size=1)
    assert [r["reward_chosen"] for r in records] == pytest.approx([r["reward_chosen"] for r in again], abs=1e-5)
    evals = [m for m in metrics_of(trained_rm) if "eval/accuracy" in m]
    assert summary["accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])
    assert summary["mean_margin"] == pytest.approx(evals[-1]["eval/margin"], abs=1e-4)
    # the transformers sequence-classification export gives the same rewards
    from preftune.models.reward import load_reward_model

    model, tokenizer = load_reward_model(trained_rm / "final")
    seq = AutoModelForSequenceClassification.from_pretrained(str(trained_rm / "final" / "seq_cls")).eval()
    ids = tokenizer(["the cat sat", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(ids["input_ids"], ids["attention_mask"])[0]
        theirs = seq(**ids).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_not_a_reward_model_is_a_clear_error(tiny_model_dir: Path) -> None:
    from preftune.models.reward import load_reward_model

    with pytest.raises(PreftuneError, match="not a preftune reward model"):
        load_reward_model(tiny_model_dir)


@pytest.mark.full
def test_a_sequence_classification_model_is_refused_before_anything_is_written(
        tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    """TRL's RewardTrainer takes AutoModelForSequenceClassification(num_labels=1): it has no LM head,
    so it is refused, in memory (the Python API) and as a folder (the CLI), and no run folder is left."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import preftune

    seq_cls = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with pytest.raises(PreftuneError, match=r"model is a LlamaForSequenceClassification, not a causal LM.*final/seq_cls"):
        preftune.reward_model(seq_cls, str(preference_files[0]), tokenizer=tokenizer, output_dir=str(tmp_path / "api"), max_steps=1)
    assert not (tmp_path / "api").exists()
    seq_cls.save_pretrained(str(tmp_path / "seq-cls"))
    tokenizer.save_pretrained(str(tmp_path / "seq-cls"))
    out = run_cli("rm", str(CONFIGS / "rm-tiny.yaml"), f"--model.path={tmp_path / 'seq-cls'}", f"--data.train={preference_files[0]}",
                  f"--train.output_dir={tmp_path / 'cli'}", "--train.progress=false", timeout=300)
    assert out.returncode == 2 and "holds a LlamaForSequenceClassification, not a causal LM" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "cli").exists()


# --------------------------------------------------------------------------- CLI
@pytest.mark.full
def test_cli_sft_then_rm_then_score(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = preference_files
    def run(*args: str) -> subprocess.CompletedProcess:
        out = run_cli(*args)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    common = [f"--data.train={train}", f"--data.eval={held}", "--train.progress=false"]
    run("sft", str(CONFIGS / "sft-tiny.yaml"), f"--model.path={tiny_model_dir}", f"--train.output_dir={tmp_path / 'sft'}",
        "--train.max_steps=10", *common)
    run("rm", str(CONFIGS / "rm-tiny.yaml"), f"--model.path={tmp_path / 'sft' / 'final'}", f"--train.output_dir={tmp_path / 'rm'}", *common)
    pairs = run("score", str(tmp_path / "rm" / "final"), str(held), "--out", str(tmp_path / "scored.jsonl"), "--json")
    summary = json.loads(pairs.stdout.strip().splitlines()[-1])
    assert summary["scored"] == 32 and summary["accuracy"] >= 0.8, summary
    scored = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 32 and all("reward_chosen" in r and "margin" in r for r in scored)
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"prompt": "review:", "response": "good great"},
                                                           {"prompt": "review:", "response": "bad awful"}])
    out = run("score", str(tmp_path / "rm" / "final"), str(responses))
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert [sorted(r) for r in rows] == [["completion", "prompt", "reward", "source"]] * 2
    assert "mean reward" in out.stderr
    bad = run_cli("score", str(tiny_model_dir), str(held), timeout=300)
    assert bad.returncode == 2 and "not a preftune reward model" in bad.stderr and "Traceback" not in bad.stderr
