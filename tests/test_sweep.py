"""`preftune dpo CONFIG --sweep KEY=V1,V2,...`: one policy per value, one reference pass (counted)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest

from conftest import DPO_TINY, dpo_config
from preftune.errors import ConfigError
from preftune.stages.sweep import parse_sweeps, variants


def test_sweep_values_are_parsed_and_checked() -> None:
    assert parse_sweeps(["loss.beta=0.05,0.1", "loss.name=dpo,ipo"]) == [("loss.beta", ["0.05", "0.1"]), ("loss.name", ["dpo", "ipo"])]
    for bad, message in (("loss.beta", "KEY=VALUE1"), ("loss.beta=0.1,", "KEY=VALUE1"), ("loss.beta=0.1,0.1", "repeated"),
                         ("train.output_dir=a,b", "cannot be swept")):
        with pytest.raises(ConfigError, match=message):
            parse_sweeps([bad])
    with pytest.raises(ConfigError, match="swept twice"):
        parse_sweeps(["loss.beta=0.1", "loss.beta=0.2"])


def test_each_value_is_a_run_folder_and_only_reference_losses_read_the_cache(tiny_model_dir: Path, preference_files, tmp_path: Path) -> None:
    cfg = dpo_config(tiny_model_dir, *preference_files, tmp_path / "sweep")
    runs = variants(cfg, parse_sweeps(["loss.name=dpo,simpo"]))
    assert [(v.label, v.folder) for v in runs] == [("name=dpo", "name-dpo"), ("name=simpo", "name-simpo")]
    assert [v.cfg.train.output_dir for v in runs] == [str(tmp_path / "sweep" / "name-dpo"), str(tmp_path / "sweep" / "name-simpo")]
    assert [v.cfg.reference.strategy for v in runs] == ["cache", "copy"]  # simpo's "copy" resolves to none: it takes no reference
    with pytest.raises(ConfigError, match="beta=-1"):
        variants(cfg, parse_sweeps(["loss.beta=0.1,-1"]))


@pytest.mark.slow
def test_a_three_value_beta_sweep_computes_the_reference_once(tiny_model_dir: Path, preference_files, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    import preftune.training.reference as reference
    from preftune.cli.main import main

    loads, forwards = [], []
    real_load = reference.load_causal_lm

    def counting_load(*args, **kwargs):  # every reference model the training runs load
        model = real_load(*args, **kwargs)
        loads.append(model)
        model.model.register_forward_hook(lambda *_: forwards.append(1))  # the scorers run the body, then the head by chunks
        return model

    monkeypatch.setattr(reference, "load_causal_lm", counting_load)
    train, held = preference_files
    out = tmp_path / "sweep"
    judge = tmp_path / "judge.py"
    judge.write_text("def longer(prompt, a, b):\n    return 0.5 if len(a) == len(b) else len(a) > len(b)\n", encoding="utf-8")
    status = main(["dpo", str(DPO_TINY), "--sweep", "loss.beta=0.05,0.1,0.2", f"--model.path={tiny_model_dir}", f"--data.train={train}",
                   f"--data.eval={held}", f"--train.output_dir={out}", "--train.progress=false", "--train.max_steps=6",
                   "--train.save_every=null", "--train.eval_every=null", f"--reference.cache_dir={tmp_path / 'cache'}",
                   f"--sweep.judge={judge}:longer"])
    assert status == 0
    # One pass over the training pairs and one over the held-out pairs, by one reference model each, in the first run only.
    batches = math.ceil(64 / 8) + math.ceil(32 / 8)
    assert len(loads) == 2 and len(forwards) == batches
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["folder"] for r in summary["runs"]] == ["beta-0.05", "beta-0.1", "beta-0.2"]
    assert [r["reference_warm"] for r in summary["runs"]] == [False, True, True] and summary["reference_passes"] == 1
    evals = []
    for name, beta in (("beta-0.05", 0.05), ("beta-0.1", 0.1), ("beta-0.2", 0.2)):
        run = out / name
        assert (run / "final" / "model.safetensors").is_file()
        assert json.loads((run / "reference.json").read_text())["strategy"] == "cache"
        assert (run / "config.yaml").read_text().count(f"beta: {beta}") == 1
        evals.append(json.loads((run / "eval.json").read_text()))
    assert all(e["kl"]["n"] > 0 and "rewards/margins" in e["preference"] for e in evals)
    # judged once per point against the reference's samples, recorded in each run's config and in sweep.json
    assert all(e["win_rate"][0]["judge"] == f"function {judge}:longer" and e["win_rate"][0]["n"] > 0 for e in evals)
    assert summary["judge"] == f"function {judge}:longer" and f"judge: {judge}:longer" in (out / "beta-0.1" / "config.yaml").read_text()
    report = html.unescape((out / "report.html").read_text())
    assert "Judge's score against KL" in report and report.count("beta=") >= 3 and (out / "plots" / "frontier.png").is_file()
    frontier = json.loads((out / "plots" / "frontier.json").read_text())
    (panel,) = frontier["panels"]  # the judge's win rate against KL, not the implicit reward margin
    assert panel["quantity"] == f"win:function {judge}:longer"
    assert [(p["x"], p["y"]) for p in panel["points"]] == sorted((e["kl"]["mean"], e["win_rate"][0]["win_rate"]) for e in evals)


def test_sweep_folder_names_are_safe_and_unique(tiny_model_dir: Path, preference_files, tmp_path: Path) -> None:
    cfg = dpo_config(tiny_model_dir, *preference_files, tmp_path / "sweep")
    runs = variants(cfg, parse_sweeps(["data.system=a/../../../escaped,b,a_.._.._.._escaped,..,.hidden"]))
    names = [v.folder for v in runs]
    assert names == ["system-a_.._.._.._escaped", "system-b", "system-a_.._.._.._escaped-2", "system-..", "system-.hidden"]
    assert len(set(names)) == len(names)
    for v in runs:
        out = Path(v.cfg.train.output_dir)
        assert out.parent == tmp_path / "sweep" and "/" not in v.folder and v.folder not in (".", "..")
    from preftune.stages.sweep import safe_name

    assert safe_name("..") == "_." and safe_name(".") == "_" and safe_name("") == "_" and safe_name("a\\b:c") == "a_b_c"


def _sweep_args(model: Path, train: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["dpo", str(DPO_TINY), "--sweep", "loss.beta=0.05,0.1,0.2", f"--model.path={model}",
            f"--data.train={train}", "--data.eval=[]", f"--train.output_dir={out}", "--train.progress=false", "--train.report=false",
            "--train.max_steps=4", "--train.batch_size=4", "--train.save_every=1", "--train.eval_every=null",
            f"--reference.cache_dir={cache}", *extra]


@pytest.mark.full
@pytest.mark.slow
def test_an_interrupted_sweep_resumes_to_the_uninterrupted_sweeps_weights(tiny_model_dir: Path, preference_files, tmp_path: Path) -> None:
    """SIGKILL while the second run trains (the third not started), then `--train.resume_from=latest`:
    the first run is kept, the second resumed from its checkpoint, the third started; every final
    model equals the uninterrupted sweep's, bit for bit (fp32)."""
    import signal
    import subprocess
    import time

    from conftest import run_cli, start_cli, weights

    env = {"PREFTUNE_CPU_BF16_UNITS": "0"}
    train = preference_files[0]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = run_cli(*_sweep_args(tiny_model_dir, train, whole, tmp_path / "cache-a"), env=env)
    assert done.returncode == 0, done.stderr
    proc = start_cli(*_sweep_args(tiny_model_dir, train, cut, tmp_path / "cache-b"), env=env, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    second = cut / "beta-0.1" / "checkpoints" / "step-1" / "manifest.json"
    deadline = time.monotonic() + 300
    while not second.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (cut / "beta-0.2").exists()  # not started when it was killed
    first_final = {p.name: p.read_bytes() for p in (cut / "beta-0.05" / "final").iterdir() if p.is_file()}
    resumed = run_cli(*_sweep_args(tiny_model_dir, train, cut, tmp_path / "cache-b", "--train.resume_from=latest"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "sweep 1/3: finished before, kept" in resumed.stderr
    assert {p.name: p.read_bytes() for p in (cut / "beta-0.05" / "final").iterdir() if p.is_file()} == first_final
    for name in ("beta-0.05", "beta-0.1", "beta-0.2"):
        a, b = weights(whole / name / "final"), weights(cut / name / "final")
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), name


def test_a_swept_value_cannot_put_a_run_outside_the_output_folder(tiny_model_dir: Path, preference_files, tmp_path: Path) -> None:
    from preftune.cli.main import main

    out = tmp_path / "a" / "b" / "sweep"
    status = main(["dpo", str(DPO_TINY), "--sweep", "data.system=x/../../../escaped,y", f"--model.path={tiny_model_dir}",
                   f"--data.train={preference_files[0]}", "--data.eval=[]", f"--train.output_dir={out}", "--train.progress=false",
                   "--train.report=false", "--train.max_steps=1", "--train.save_every=null", f"--reference.cache_dir={tmp_path / 'cache'}"])
    assert status == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["system-x_.._.._.._escaped", "system-y"]
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "a" / "escaped").exists()
    assert [r["folder"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == ["system-x_.._.._.._escaped", "system-y"]


#: every paired loss by preftune's name; TRL's names are checked as configs below and trained in test_dpo.py
FAMILY = ["dpo", "ipo", "hinge", "robust", "discopop", "dpo_norm", "nca", "bco", "sppo", "apo_zero", "apo_down", "aot", "aot_unpaired",
          "sft", "dpop", "rdpo", "simpo", "orpo", "cpo"]


def test_every_trl_loss_type_is_a_sweep_value(tiny_model_dir: Path, preference_files, tmp_path: Path) -> None:
    from preftune.config.trl_names import TRL_LOSS_TYPES

    cfg = dpo_config(tiny_model_dir, *preference_files, tmp_path / "sweep")
    names = [n for n in TRL_LOSS_TYPES if n != "exo_pair"]  # exo needs label_smoothing > 0, which most others refuse
    runs = variants(cfg, parse_sweeps([f"loss.name={','.join(names)}"]))
    assert [v.cfg.loss.name for v in runs] == names
    with pytest.raises(ConfigError, match="exo needs 0 < label_smoothing"):
        variants(cfg, parse_sweeps(["loss.name=sigmoid,exo_pair"]))


def test_a_sweep_over_the_whole_paired_family_trains_each_on_one_reference_pass(tiny_model_dir: Path, preference_files,
                                                                                 tmp_path: Path, one_thread: None) -> None:
    from preftune.cli.main import main

    train, _ = preference_files
    out = tmp_path / "family"
    status = main(["dpo", str(DPO_TINY), "--sweep", f"loss.name={','.join(FAMILY)}", f"--model.path={tiny_model_dir}",
                   f"--data.train={train}", "--data.eval=[]", f"--train.output_dir={out}", "--train.progress=false", "--train.max_steps=3",
                   "--train.log_every=1", "--train.save_every=null", "--train.eval_every=null", "--train.report=false",
                   f"--reference.cache_dir={tmp_path / 'cache'}"])
    assert status == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["folder"] for r in summary["runs"]] == [f"name-{n}" for n in FAMILY]
    assert summary["reference_passes"] == 1  # the first run computes it, every other reference loss reads it
    for record in summary["runs"]:
        name = record["folder"].removeprefix("name-")
        free = name in ("sft", "simpo", "orpo", "cpo")  # their configured "copy" resolves to no reference at all
        assert (record["reference_warm"] is None) if free else (record["reference"] == "cache" and record["reference_warm"] is not None), record
        metrics = [json.loads(line) for line in (out / record["folder"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics), name
        assert (out / record["folder"] / "final" / "model.safetensors").is_file()


def test_a_sweep_judge_needs_held_out_prompts_and_a_single_run_refuses_it(tiny_model_dir: Path, preference_files, tmp_path: Path) -> None:
    import preftune
    from preftune.cli.main import main

    train, _ = preference_files
    common = dict(model=str(tiny_model_dir), train={"output_dir": str(tmp_path / "s"), "max_steps": 1, "progress": False},
                  data={"train": [str(train)], "eval": []})
    with pytest.raises(ConfigError, match="sweep.judge: a sweep judges samples on the held-out prompts"):
        preftune.sweep({"loss.beta": [0.1, 0.2]}, judge=lambda prompt, a, b: 0.5, **common)
    assert not (tmp_path / "s").exists()  # refused before any training
    with pytest.raises(ConfigError, match="read by preftune.sweep only"):
        preftune.dpo(**common, sweep={"judge": "judges:better"})
    status = main(["dpo", str(DPO_TINY), f"--model.path={tiny_model_dir}", f"--data.train={train}", "--sweep.judge=judges:better",
                   f"--train.output_dir={tmp_path / 'one'}"])
    assert status != 0 and not (tmp_path / "one").exists()
