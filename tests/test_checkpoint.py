"""checkpoint.py: atomic checkpoints that restore everything a run needs, and run no code.

A save/load round trip restores the trainable weights, the optimizer's and the scheduler's
states, the RNG streams and the loop state, so training continues exactly; every file is read
as plain data (a crafted pickle does not run); the latest complete checkpoint is found by
number; pruning keeps the newest; a checkpoint of other trainable parameters is refused. Every
checkpoint holds a manifest (sizes and sha256 of its files, written last): a folder whose manifest
is missing or does not match is never resumed from; a resume under another config is refused,
naming the settings that differ.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from preftune.errors import TrainingError
from preftune.training.checkpoint import (
    MANIFEST_FILE,
    RESUME_MAY_CHANGE,
    STATE_FILE,
    WEIGHTS_FILE,
    LoopState,
    check_resume,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
    write_manifest,
)


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def trainer(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step on data drawn from torch's RNG (so a restored RNG gives the same batch)."""
    x = torch.randn(5, 4)
    loss = model(x).pow(2).mean() + 0.01 * random.random()  # Python's RNG feeds the step too
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def make_checkpoint(folder: Path, seed: int = 0, steps: int = 3) -> tuple[nn.Module, Path]:
    model = tiny(seed)
    optimizer, scheduler = trainer(model)
    for _ in range(steps):
        train_step(model, optimizer, scheduler)
    path = save_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler, state=LoopState(step=steps))
    return model, path


# --------------------------------------------------------------------------- round trip
def test_save_and_load_restore_weights_optimizer_scheduler_rng_and_loop_state(tmp_path: Path) -> None:
    model = tiny(0)
    optimizer, scheduler = trainer(model)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    state = LoopState(step=3, epoch=1, batches_in_epoch=5, examples_seen=24, tokens_seen=321)
    folder = save_checkpoint(tmp_path / "checkpoints" / "step-3", model=model, optimizer=optimizer, scheduler=scheduler, state=state)
    assert folder == tmp_path / "checkpoints" / "step-3"
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE,
                                                                MANIFEST_FILE])
    assert [p.name for p in folder.parent.iterdir()] == ["step-3"]  # no step-3.tmp left behind
    assert json.loads((folder / STATE_FILE).read_text())["tokens_seen"] == 321

    # the uninterrupted run goes on for two more steps
    saved_weights = {k: v.clone() for k, v in trainable_state(model).items()}
    for _ in range(2):
        train_step(model, optimizer, scheduler)

    # another model, a fresh optimizer and scheduler, the RNG moved on: the checkpoint restores it all
    other = tiny(1)
    other_optimizer, other_scheduler = trainer(other)
    torch.rand(7), random.random()
    loaded = load_checkpoint(folder, model=other, optimizer=other_optimizer, scheduler=other_scheduler)
    assert loaded == state
    for name, value in trainable_state(other).items():
        assert torch.equal(value, saved_weights[name]), name
    assert other_scheduler.last_epoch == 3 and other_scheduler.get_last_lr() == pytest.approx([1e-2 / 4])
    restored = other_optimizer.state_dict()["state"]
    assert len(restored) == 4 and all(float(s["step"]) == 3.0 for s in restored.values())
    assert all(float(s["exp_avg"].abs().sum()) > 0 for s in restored.values())
    for _ in range(2):
        train_step(other, other_optimizer, other_scheduler)
    # same data (restored RNG), same Adam moments, same learning rate: the very same weights
    for name, value in trainable_state(other).items():
        assert torch.equal(value, trainable_state(model)[name]), name


def test_saving_again_replaces_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "step-1"
    make_checkpoint(folder, steps=1)
    (folder / "stray.txt").write_text("left from before")
    (tmp_path / "step-1.tmp").mkdir()  # a save that died half-way
    (tmp_path / "step-1.tmp" / "junk").write_text("x")
    make_checkpoint(folder, steps=2)
    assert not (folder / "stray.txt").exists() and not (tmp_path / "step-1.tmp").exists()
    assert json.loads((folder / STATE_FILE).read_text())["step"] == 2


# --------------------------------------------------------------------------- RNG
def test_rng_state_restores_python_and_torch_streams() -> None:
    random.seed(123)
    torch.manual_seed(123)
    random.random(), torch.rand(2)  # somewhere in the middle of both streams
    saved = rng_state()
    before = ([random.random() for _ in range(5)], torch.rand(5), torch.randint(0, 1000, (5,)))
    random.random(), torch.rand(11)  # the streams move on
    set_rng_state(saved)
    after = ([random.random() for _ in range(5)], torch.rand(5), torch.randint(0, 1000, (5,)))
    assert before[0] == after[0]
    assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_a_checkpoint_restores_the_rng_streams_of_its_save(tmp_path: Path) -> None:
    _, folder = make_checkpoint(tmp_path / "step-3")
    expected = (random.random(), torch.rand(4))  # what the run drew right after saving
    random.random(), torch.rand(9)
    model = tiny(0)
    optimizer, scheduler = trainer(model)
    load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler)
    assert random.random() == expected[0] and torch.equal(torch.rand(4), expected[1])


# --------------------------------------------------------------------------- no code runs on load
class RunsACommand:
    """Unpickling this calls os.system: what a malicious checkpoint file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (self.command,))


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt", "scheduler.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, name: str) -> None:
    _, folder = make_checkpoint(tmp_path / "step-3")
    marker = tmp_path / "MARKER"
    torch.save({"python": RunsACommand(f"touch {marker}")}, folder / name)
    write_manifest(folder)  # whoever crafts the file can rewrite the manifest too
    model = tiny(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, scheduler = trainer(model)
    with pytest.raises(TrainingError, match=f"{name}|cannot be read as plain data"):
        load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not marker.exists(), "loading the checkpoint ran the pickled command"
    # nothing was restored from a checkpoint that could not be read whole
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same file read without weights_only would have run it: the test's payload is real
    torch.load(folder / name, weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------- finding and pruning
def fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    folder = root / "checkpoints" / name
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_text("{}")
        (folder / WEIGHTS_FILE).write_text("w")
        write_manifest(folder)
    return folder


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None  # no checkpoints folder
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None  # an empty one
    fake_checkpoint(tmp_path, "step-2")
    ten = fake_checkpoint(tmp_path, "step-10")  # by number: step-10 is after step-2
    fake_checkpoint(tmp_path, "step-12.tmp")  # a save killed before its rename
    fake_checkpoint(tmp_path, "step-15", complete=False)  # no manifest
    fake_checkpoint(tmp_path, "step-x")
    fake_checkpoint(tmp_path, "best")
    (tmp_path / "checkpoints" / "step-20").write_text("a file, not a folder")
    assert latest_checkpoint(tmp_path) == ten


def test_prune_keeps_the_newest_two(tmp_path: Path) -> None:
    for step in (1, 2, 3, 10):
        fake_checkpoint(tmp_path, f"step-{step}")
    fake_checkpoint(tmp_path, "step-4.tmp")
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10", "step-3", "step-4.tmp"]
    prune_checkpoints(tmp_path, 5)  # fewer than keep: nothing goes
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-10"
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3


# --------------------------------------------------------------------------- mismatches
def test_a_checkpoint_of_other_trainable_parameters_is_refused(tmp_path: Path) -> None:
    _, folder = make_checkpoint(tmp_path / "step-3")
    frozen_first = tiny(0)
    frozen_first[0].weight.requires_grad_(False)  # e.g. the run used LoRA or froze a layer, this one does not
    optimizer, scheduler = trainer(frozen_first)
    with pytest.raises(TrainingError, match=r"does not match this model's trainable parameters \(missing \[\], unexpected \['0.weight'\]\)"):
        load_checkpoint(folder, model=frozen_first, optimizer=optimizer, scheduler=scheduler)

    bigger = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
    optimizer, scheduler = trainer(bigger)
    with pytest.raises(TrainingError, match=r"missing \['3.bias', '3.weight'\], unexpected \[\]"):
        load_checkpoint(folder, model=bigger, optimizer=optimizer, scheduler=scheduler)


def test_a_folder_without_state_is_not_a_checkpoint(tmp_path: Path) -> None:
    model = tiny(0)
    optimizer, scheduler = trainer(model)
    with pytest.raises(TrainingError, match="is not a preftune checkpoint"):
        load_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)


# --------------------------------------------------------------------------- manifest
def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path: Path) -> None:
    import hashlib

    _, folder = make_checkpoint(tmp_path / "checkpoints" / "step-3")
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_FILE)
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", ["no manifest", "a changed byte", "a cut file", "a missing file", "a bad manifest"])
def test_a_checkpoint_without_a_valid_manifest_is_never_resumed_from(tmp_path: Path, damage: str, capsys) -> None:  # noqa: ANN001
    make_checkpoint(tmp_path / "checkpoints" / "step-2")
    _, newest = make_checkpoint(tmp_path / "checkpoints" / "step-5")
    weights_file = newest / WEIGHTS_FILE
    if damage == "no manifest":
        (newest / MANIFEST_FILE).unlink()
    elif damage == "a changed byte":
        data = bytearray(weights_file.read_bytes())
        data[-1] ^= 1
        weights_file.write_bytes(bytes(data))
    elif damage == "a cut file":
        weights_file.write_bytes(weights_file.read_bytes()[:-10])
    elif damage == "a missing file":
        (newest / "optimizer.pt").unlink()
    else:
        (newest / MANIFEST_FILE).write_text("{not json")
    # latest skips it, saying why, and takes the older intact one
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-2"
    assert "skipping checkpoint" in capsys.readouterr().err
    # named explicitly, it is refused
    model = tiny(0)
    optimizer, scheduler = trainer(model)
    with pytest.raises(TrainingError, match="is not resumed from"):
        load_checkpoint(newest, model=model, optimizer=optimizer, scheduler=scheduler)

    class Train:
        resume_from = str(newest)

    with pytest.raises(TrainingError, match="is not resumed from"):
        resolve_resume(Train, tmp_path)


def test_latest_with_no_intact_checkpoint_says_why(tmp_path: Path) -> None:
    _, only = make_checkpoint(tmp_path / "checkpoints" / "step-1")
    (only / MANIFEST_FILE).unlink()

    class Train:
        resume_from = "latest"

    with pytest.raises(TrainingError, match=r"holds no complete checkpoint .*step-1.*no manifest.json"):
        resolve_resume(Train, tmp_path, say=lambda line: None)


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    model = tiny(0)
    optimizer, scheduler = trainer(model)
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(TrainingError, match=r"not all finite \(2.bias\)"):
        save_checkpoint(tmp_path / "step-1", model=model, optimizer=optimizer, scheduler=scheduler, state=LoopState(step=1))
    assert not (tmp_path / "step-1").exists() and not (tmp_path / "step-1.tmp").exists()


def test_a_resume_under_another_config_names_what_differs(tmp_path: Path) -> None:
    config = {"train": {"lr": 1e-3, "max_steps": 10, "save_every": 2, "batch_size": 4}, "loss": {"beta": 0.1}}
    model = tiny(0)
    optimizer, scheduler = trainer(model)
    folder = save_checkpoint(tmp_path / "step-1", model=model, optimizer=optimizer, scheduler=scheduler,
                             state=LoopState(step=1), config=config)
    check_resume(folder, config)  # the same config
    longer = {"train": {**config["train"], "max_steps": 50, "save_every": 5}, "loss": {"beta": 0.1}}
    check_resume(folder, longer)  # what a resume may change
    assert "train.max_steps" in RESUME_MAY_CHANGE and "train.lr" not in RESUME_MAY_CHANGE
    other = {"train": {**config["train"], "lr": 1e-2}, "loss": {"beta": 0.5}, "data": {"train": "x.jsonl"}}
    with pytest.raises(TrainingError, match=r"another config.*data.train \('<unset>' -> 'x.jsonl'\); loss.beta \(0.1 -> 0.5\); "
                                            r"train.lr \(0.001 -> 0.01\)"):
        check_resume(folder, other)
