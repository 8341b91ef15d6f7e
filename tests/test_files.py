"""system/files.py: the one atomic write (a file, a folder) and the file digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from preftune.system.files import atomic_write, file_digest, replace_folder, temporary_folder


def test_an_atomic_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")
    assert atomic_write(path, lambda tmp: tmp.write_text("new")) == path
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_folder_is_written_under_a_temporary_name_then_put_in_place(tmp_path: Path) -> None:
    (tmp_path / "step-1.tmp").mkdir()
    (tmp_path / "step-1.tmp" / "junk").write_text("left by a killed save")
    (tmp_path / "step-1").mkdir()
    (tmp_path / "step-1" / "old").write_text("x")
    tmp = temporary_folder(tmp_path / "step-1")
    assert tmp == tmp_path / "step-1.tmp" and list(tmp.iterdir()) == []
    (tmp / "state.json").write_text("{}")
    replace_folder(tmp, tmp_path / "step-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    assert [p.name for p in (tmp_path / "step-1").iterdir()] == ["state.json"]


def test_the_digest_is_the_sha256_of_the_bytes_and_follows_a_change(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"one\n")
    assert file_digest(path) == hashlib.sha256(b"one\n").hexdigest()
    path.write_bytes(b"two lines\n")
    assert file_digest(path) == hashlib.sha256(b"two lines\n").hexdigest()
