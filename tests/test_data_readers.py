"""readers.py: every supported container yields the right records with the right locations."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest

from preftune.data import jsonarray
from preftune.data.readers import RawRecord, parse_json_cell, read_records
from preftune.errors import DataError

RECORDS = [
    {"prompt": "p0", "chosen": "c0", "rejected": "r0"},
    {"prompt": "p1 with \"quotes\", commas, ] and }", "chosen": "c1", "rejected": "r1"},
    {"prompt": "p2 é ü 中文", "chosen": "c2", "rejected": "r2"},
]


def _data(records: list[RawRecord]) -> list[dict]:
    return [r.data for r in records]


def test_jsonl_lines_are_one_based_and_blank_lines_are_not_records(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1]), "   ", json.dumps(RECORDS[2])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = list(read_records(path))
    assert _data(got) == RECORDS
    assert [r.line for r in got] == [1, 3, 5]
    assert [r.index for r in got] == [0, 1, 2]
    assert got[1].location == f"{path}:3"
    assert all(r.error is None and not r.from_text for r in got)


def test_jsonl_with_utf8_bom_reads(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS[0]).encode() + b"\n")
    assert _data(list(read_records(path))) == [RECORDS[0]]


def test_gzip_is_detected_by_extension_and_by_content(tmp_path: Path) -> None:
    payload = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    by_name = tmp_path / "d.jsonl.gz"
    by_name.write_bytes(gzip.compress(payload))
    by_content = tmp_path / "really-gzip.jsonl"  # misnamed: gzip bytes, no .gz
    by_content.write_bytes(gzip.compress(payload))
    assert _data(list(read_records(by_name))) == RECORDS
    assert _data(list(read_records(by_content))) == RECORDS


def test_json_array_and_gzipped_json_array(tmp_path: Path) -> None:
    plain = tmp_path / "d.json"
    plain.write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False), encoding="utf-8")
    zipped = tmp_path / "d.json.gz"
    zipped.write_bytes(gzip.compress(json.dumps(RECORDS).encode()))
    for path in (plain, zipped):
        got = list(read_records(path))
        assert _data(got) == RECORDS
        assert [(r.line, r.index) for r in got] == [(None, 0), (None, 1), (None, 2)]
        assert got[2].location == f"{path}:2"


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    got = list(read_records(path))
    assert _data(got) == RECORDS
    assert [r.line for r in got] == [1, 2, 3]


def test_json_array_element_that_is_not_an_object_is_a_record_error(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([RECORDS[0], [1, 2], "text", RECORDS[1]]), encoding="utf-8")
    got = list(read_records(path))
    assert [r.error.reason if r.error else None for r in got] == [None, "not_an_object", "not_an_object", None]
    assert "record 1" in str(got[1].error) and "got an array" in str(got[1].error)
    assert got[3].data == RECORDS[1]


class _CountingReader(io.StringIO):
    """A text stream that remembers how much has been read from it."""

    chars_read = 0

    def read(self, size: int = -1) -> str:
        chunk = super().read(size)
        self.chars_read += len(chunk)
        return chunk


def test_json_array_streams_with_bounded_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonarray, "CHUNK_CHARS", 64)
    records = [{"i": i, "text": f"record {i}, with ] and }} inside \"quotes\"", "n": 12345} for i in range(500)]
    stream = _CountingReader(json.dumps(records, indent=1))
    reader = jsonarray.JsonArrayReader(stream, "mem.json")
    it = reader.values()
    first = next(it)
    assert first == records[0]
    # Only a little of the text has been read to yield the first record.
    assert stream.chars_read < 1000
    biggest = 0
    got = [first]
    for value in it:
        got.append(value)
        biggest = max(biggest, len(reader.buf))
    assert got == records
    # The buffer holds undecoded text only: one record and a chunk, never the whole array.
    assert biggest < 400 < len(stream.getvalue())


def test_json_array_with_a_huge_record_grows_reads_geometrically(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonarray, "CHUNK_CHARS", 1024)
    big = "x" * 3_000_000
    stream = _CountingReader(json.dumps([{"a": 1}, {"big": big}, {"a": 2}]))
    reads: list[int] = []
    original = stream.read

    def counting_read(size: int = -1) -> str:
        reads.append(size)
        return original(size)

    stream.read = counting_read  # type: ignore[method-assign]
    got = list(jsonarray.JsonArrayReader(stream, "big.json").values())
    assert got == [{"a": 1}, {"big": big}, {"a": 2}]
    # Doubling read sizes: about log2(3e6 / 1024) = 12 reads, not 3000.
    assert len(reads) < 30


def test_csv_rows_are_text_records_with_indices(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\np0,c0,r0\n"multi\nline, p1",c1,r1\n', encoding="utf-8")
    got = list(read_records(path))
    assert _data(got) == [
        {"prompt": "p0", "chosen": "c0", "rejected": "r0"},
        {"prompt": "multi\nline, p1", "chosen": "c1", "rejected": "r1"},
    ]
    assert [r.index for r in got] == [0, 1] and all(r.from_text for r in got)


def test_tsv_is_read_with_tabs(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("prompt\tchosen\trejected\na, b\tc\td\n", encoding="utf-8")
    assert _data(list(read_records(path))) == [{"prompt": "a, b", "chosen": "c", "rejected": "d"}]


def test_csv_row_with_wrong_number_of_values_is_a_record_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\na,b\na,b,c\na,b,c,d\n", encoding="utf-8")
    got = list(read_records(path))
    assert [r.error.reason if r.error else None for r in got] == ["malformed_row", None, "malformed_row"]
    assert "record 0" in str(got[0].error)


def test_parse_json_cell_decodes_only_chat_like_json() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert parse_json_cell(json.dumps(messages)) == messages
    assert parse_json_cell(' {"role": "user", "content": "x"} ') == {"role": "user", "content": "x"}
    for text in ("[1, 2]", "[citation needed]", "3", "plain text", "[]", '"quoted"'):
        assert parse_json_cell(text) == text
    assert parse_json_cell(None) is None


def test_parquet_is_read_in_batches(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(600)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    got = list(read_records(path))
    assert _data(got) == rows
    assert [r.index for r in got] == list(range(600))
    assert got[599].location == f"{path}:599"


def test_datasets_folder_and_single_split_dict(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    two = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)})
    two.save_to_disk(str(tmp_path / "two"))
    assert _data(list(read_records(tmp_path / "ds"))) == rows
    assert _data(list(read_records(tmp_path / "dd"))) == rows
    with pytest.raises(DataError, match="splits train, test; pass one split's folder"):
        list(read_records(tmp_path / "two"))
    assert _data(list(read_records(tmp_path / "two" / "test"))) == rows


def test_plain_folder_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match="save_to_disk") as err:
        list(read_records(tmp_path / "notes"))
    assert err.value.file == str(tmp_path / "notes")


def test_max_records_stops_early(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    assert _data(list(read_records(path, max_records=2))) == RECORDS[:2]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_json_array_values_split_across_tiny_chunks(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """A number cut at a chunk's end must not be decoded short (12345 read as 12)."""
    monkeypatch.setattr(jsonarray, "CHUNK_CHARS", chunk)
    text = ' [12345, -6.5e3 ,{"a": [1, 2, {"b": "x\\"y"}]}, "str", true, null, 0]  \n'
    assert list(jsonarray.JsonArrayReader(io.StringIO(text), "t.json").values()) == json.loads(text)


@pytest.mark.parametrize("text,problem", [
    ('{"prompt": "a", "prompt": "b", "chosen": "c", "rejected": "d"}', "the key 'prompt' appears twice"),
    ('{"prompt": "\\ud800", "chosen": "c", "rejected": "d"}', "lone surrogate"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_json_the_standard_allows_but_no_tokenizer_takes_is_a_located_error(tmp_path: Path, text: str, problem: str,
                                                                            layout: str) -> None:
    good = '{"prompt": "p", "chosen": "c", "rejected": "r"}'
    path = tmp_path / f"data.{layout}"
    path.write_text(f"{good}\n{text}\n" if layout == "jsonl" else f"[{good}, {text}]", encoding="utf-8")
    if layout == "jsonl":  # one bad line: that record is the error (skippable with on_error=skip)
        records = list(read_records(path))
        assert records[0].error is None and problem in str(records[1].error) and "line 2" in str(records[1].error)
    else:  # inside an array nothing after it can be trusted: the file stops there, naming the element
        with pytest.raises(DataError, match=f"record 1: invalid JSON: .*{problem}"):
            list(read_records(path))
