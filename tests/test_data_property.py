"""Property tests of the readers and format detection: whatever the bytes or the JSON, the only
outcomes are clean records or a located error.

Random bytes under every supported extension, random JSON documents as JSONL records (and as one
JSON array), random field names and values through format detection: either the load gives
records whose fields are text or well-formed chat messages (and the report's counts add up), or
it raises a :class:`~preftune.errors.DataError` naming the file (and the line or record where
one is to blame). Never another exception, never a hang.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.data import load_examples
from preftune.data.formats import FORMATS, detect_format
from preftune.data.readers import RawRecord
from preftune.data.records import PreferenceExample, UnpairedExample
from preftune.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".jsonl.gz", ".parquet", ".ndjson")
FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "messages", "response1", "response2", "annotator1",
          "instruction", "input", "system", "role", "content", "weight", "question", "response")
SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True) | text
keys = st.sampled_from(FIELDS) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                           max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": scalars}),
                    max_size=3)
records = st.dictionaries(keys, json_values | messages | text, max_size=6)


def _clean_text(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str) for m in value)


def _check_outcome(path: Path, on_error: str) -> None:
    try:
        result = load_examples(path, on_error=on_error)
    except DataError as err:
        assert path.name in str(err), str(err)
        return
    report = result.report
    assert report.kept == len(result.examples)
    assert report.records == report.kept + sum(report.dropped.values())
    for example in result.examples:
        if isinstance(example, PreferenceExample):
            assert _clean_text(example.prompt) and _clean_text(example.chosen) and _clean_text(example.rejected)
        else:
            assert isinstance(example, UnpairedExample)
            assert _clean_text(example.prompt) and _clean_text(example.completion) and isinstance(example.desirable, bool)


@SETTINGS
@given(data=st.binary(max_size=300), extension=st.sampled_from(EXTENSIONS), on_error=st.sampled_from(["error", "skip"]))
def test_random_bytes_give_clean_records_or_a_located_error(data: bytes, extension: str, on_error: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{extension}"
        path.write_bytes(data)
        _check_outcome(path, on_error)


@SETTINGS
@given(documents=st.lists(records | json_values, min_size=1, max_size=5), on_error=st.sampled_from(["error", "skip"]),
       as_array=st.booleans())
def test_random_json_documents_give_clean_records_or_a_located_error(documents: list[Any], on_error: str, as_array: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        if as_array:
            path = Path(folder) / "data.json"
            path.write_text(json.dumps(documents), encoding="utf-8")
        else:
            path = Path(folder) / "data.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
        _check_outcome(path, on_error)


@SETTINGS
@given(record=records)
def test_format_detection_names_a_format_or_says_where_it_could_not(record: dict[str, Any]) -> None:
    raw = RawRecord(record, "data.jsonl", 7, 6)
    try:
        found = detect_format(raw, record)
    except DataError as err:
        assert "data.jsonl, line 7" in str(err)
        return
    assert found in FORMATS
