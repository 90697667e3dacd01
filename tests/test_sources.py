"""JSONL prompt sources: the format presets on the paper's data, and errors that say where."""

import itertools
import json
from pathlib import Path

import pytest

from gtpo_jax.data.sources import DataError, FieldMap, read_jsonl, read_parquet, read_records

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} (the project's shared data) is absent")


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@needs_shared
def test_gsm8k_preset_on_real_lines():
    records = list(itertools.islice(read_jsonl(SHARED / "gsm8k" / "test.jsonl", "gsm8k"), 5))
    assert records[0]["answer"] == "18" and records[0]["prompt"].startswith("Janet")
    assert records[0]["id"] == "test-1" and all(r["answer"].lstrip("-").isdigit() for r in records)
    assert records[0]["solution"].endswith("#### 18")


@needs_shared
@pytest.mark.parametrize(("folder", "preset"), [("math500", "math"), ("dapo_math_17k", "dapo"), ("aime24", "math")])
def test_math_and_dapo_presets_on_real_lines(folder, preset):
    name = "train.jsonl" if folder == "dapo_math_17k" else "test.jsonl"
    records = list(itertools.islice(read_jsonl(SHARED / folder / name, preset), 5))
    assert len(records) == 5 and all(r["prompt"] and r["answer"] and r["id"] for r in records)
    if folder == "math500":
        assert records[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)" and "solution" in records[0]


def test_answer_from_solution_boxed_when_no_answer_field(tmp_path):
    path = _write(tmp_path, [{"problem": "p", "solution": "so \\boxed{\\frac{1}{2}} and \\boxed{7}"}])
    [record] = read_jsonl(path, "math")
    assert record["answer"] == "7" and record["id"] == "data-1"


def test_custom_field_map(tmp_path):
    path = _write(tmp_path, [{"q": "2+2?", "a": "4", "uid": 9, "level": 1}])
    [record] = read_jsonl(path, FieldMap(prompt="q", answer="a", id="uid"))
    assert record == {"id": "9", "prompt": "2+2?", "answer": "4", "level": 1}


def test_errors_name_file_line_and_fields(tmp_path):
    path = _write(tmp_path, [{"question": "q", "answer": "#### 3"}, {"questoin": "typo", "answer": "#### 4"}])
    with pytest.raises(
        DataError, match=r"data\.jsonl:2: missing field 'question'; the record has fields \['answer', 'questoin'\]"
    ):
        list(read_jsonl(path, "gsm8k"))
    path = _write(tmp_path, [{"question": "q", "answer": "no final line"}], "g.jsonl")
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'answer' has no '#### <answer>' line"):
        list(read_jsonl(path, "gsm8k"))
    path = _write(tmp_path, [{"problem": "p", "answer": "1"}, '{"problem": "p",'], "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(read_jsonl(path, "dapo"))
    path = _write(tmp_path, [{"problem": "p"}], "m.jsonl")
    with pytest.raises(
        DataError, match=r"m\.jsonl:1: missing field 'answer' or 'solution'; the record has fields \['problem'\]"
    ):
        list(read_jsonl(path, "math"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(
    ("preset", "raw"),
    [
        ("dapo", {"problem": "p", "answer": "  "}),
        ("gsm8k", {"question": "q", "answer": "work\n#### "}),
        ("math", {"problem": "p", "solution": "so \\boxed{}"}),
    ],
)
def test_an_empty_reference_answer_is_refused_with_its_line(tmp_path, preset, raw):
    # An empty reference would make an empty \boxed{} correct.
    good = {"problem": "p", "question": "q", "answer": "#### 1" if preset == "gsm8k" else "1"}
    path = _write(tmp_path, [good, raw], "e.jsonl")
    with pytest.raises(DataError, match=r"e\.jsonl:2: the reference answer \(field 'answer'\) is empty"):
        list(read_jsonl(path, preset))


def test_parquet_with_field_map_and_row_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
        {"question": "Half of 1,000?", "answer": "#### 500"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    records = list(read_parquet(tmp_path / "train.parquet", "gsm8k"))
    assert [r["answer"] for r in records] == ["5", "500"] and records[1]["id"] == "train-2"
    assert records[0]["solution"] == "2+3=5\n#### 5"
    pq.write_table(
        pa.Table.from_pylist([{"problem": "p", "answer": "1"}, {"problem": None, "answer": "2"}]),
        tmp_path / "null.parquet",
    )
    with pytest.raises(
        DataError, match=r"null\.parquet:row 2: missing field 'problem'; the record has fields \['answer'\]"
    ):
        list(read_parquet(tmp_path / "null.parquet", "dapo"))
    pq.write_table(pa.Table.from_pylist([{"prob": "q", "sol": "3"}]), tmp_path / "bad.parquet")
    with pytest.raises(
        DataError, match=r"bad\.parquet:row 1: missing field 'problem'; the record has fields \['prob', 'sol'\]"
    ):
        list(read_parquet(tmp_path / "bad.parquet", "dapo"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        list(read_parquet(tmp_path / "junk.parquet"))


def test_tfds_data_source_decodes_bytes_and_maps_fields():
    """A tfds builder read through `tfds.data_source` (mocked: no download, no TensorFlow)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    seen = {}

    def as_data_source(builder, split=None, **kwargs):
        seen["call"] = (builder.name, split)
        return [
            {"question": b"Solve 24 = 4*x.", "answer": b"x = 6\n#### 6"},
            {"question": b"1+1?", "answer": b"#### 2"},
        ]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        records = list(read_records("tfds", "math_dataset/algebra__linear_1d", "gsm8k", split="test"))
    assert seen["call"] == ("math_dataset", "test")
    assert records[0] == {
        "id": "math_dataset/algebra__linear_1d-test-0",
        "prompt": "Solve 24 = 4*x.",
        "answer": "6",
        "solution": "x = 6\n#### 6",
    }
    with pytest.raises(DataError, match="unknown source kind 'csv'"):
        read_records("csv", "x", "gsm8k")
