"""A run's own data file: JSON, JSON lines, CSV or a dataset folder, with its columns mapped to ours."""

from __future__ import annotations

import csv
import json

import pytest

from secure_fedllm.config import RunConfig
from secure_fedllm.data.sources import load_federation_data, read_source_rows
from secure_fedllm.errors import ConfigError

ROWS = [{"question": f"What is {i}?", "context": f"c{i}", "answer": f"It is {i}.", "site": i % 2} for i in range(30)]
MAPPING = 'data.fields={instruction = "question", input = "context", output = "answer"}'


def _config(path, *extra: str) -> RunConfig:
    return RunConfig().with_overrides(
        ['data.source="file"', f'data.path="{path}"', "evaluation.heldout_records=6", "federation.clients=3", *extra]
    )


def _write(tmp_path, kind: str):
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    else:
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv"])
def test_every_format_reads_the_same_records_through_the_mapping(tmp_path, kind):
    config = _config(_write(tmp_path, kind), MAPPING)
    rows = read_source_rows(config)
    assert [(r["instruction"], r["input"], r["output"]) for r in rows] == [
        (r["question"], r["context"], r["answer"]) for r in ROWS
    ]
    data = load_federation_data(config)
    assert len(data.heldout) == 6 and sum(len(c) for c in data.clients) == 24
    texts = {r.instruction for c in data.clients for r in c} | {r.instruction for r in data.heldout}
    assert texts == {r["question"] for r in ROWS}


def test_an_unmapped_column_is_named_with_the_setting_that_fixes_it(tmp_path):
    config = _config(_write(tmp_path, "csv"))  # control: without the mapping the file has no 'instruction'
    with pytest.raises(ConfigError, match=r"line 2 has no 'instruction' column; map instruction.*data\.fields"):
        read_source_rows(config)


def test_a_mapping_to_a_missing_column_and_a_bad_field_are_refused(tmp_path):
    config = _config(_write(tmp_path, "json"), 'data.fields={instruction = "prompt", output = "answer"}')
    with pytest.raises(ConfigError, match=r"record 0 has data\.fields maps instruction to 'prompt'"):
        read_source_rows(config)
    with pytest.raises(ConfigError, match=r"unknown field 'person'"):
        _config(tmp_path / "d.json", 'data.fields={person = "site"}')


def test_an_unknown_suffix_asks_for_data_format(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(ConfigError, match=r"set data\.format to json, jsonl, csv or hf"):
        read_source_rows(_config(path))
