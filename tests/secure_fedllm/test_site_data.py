"""A site's own records: each format, a custom column mapping, and errors that name what is wrong."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter

import pytest

from secure_fedllm.data import SiteDataSpec, TextRecord, load_alpaca, load_site_records, split_heldout
from secure_fedllm.errors import ConfigError

ROWS = [
    {"instruction": "Summarise the visit", "input": "", "output": "Routine check.", "person": "p1"},
    {"instruction": "Name the drug", "input": "notes: 5mg", "output": "Warfarin", "person": "p2"},
    {"instruction": "Next appointment?", "input": "", "output": "In May.", "person": "p1"},
]


def _write(path, fmt, rows=ROWS):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_each_file_format_reads_the_same_records(tmp_path, fmt):
    spec = SiteDataSpec(path=_write(tmp_path / f"site.{fmt}", fmt))
    assert spec.format == fmt  # from the suffix
    records = load_site_records(spec, by_person=False)
    assert records == [
        TextRecord(r["instruction"], r["input"], r["output"], unit=f"record-{i}") for i, r in enumerate(ROWS)
    ]


def test_csv_with_a_custom_mapping_from_node_config(tmp_path):
    renamed = [
        {"question": r["instruction"], "context": r["input"], "answer": r["output"], "patient": r["person"]}
        for r in ROWS
    ]
    path = _write(tmp_path / "export.txt", "csv", renamed)  # the suffix says nothing: the format is given
    spec = SiteDataSpec.from_node_config(
        {
            "data-path": str(path),
            "data-format": "csv",
            "data-fields": "instruction=question, input=context,output=answer,person=patient",
            "data-heldout-fraction": "0.25",
        }
    )
    assert spec is not None and spec.format == "csv" and spec.heldout_fraction == 0.25
    records = load_site_records(spec, by_person=True)
    assert [r.instruction for r in records] == [r["instruction"] for r in ROWS]
    assert [r.input for r in records] == [r["input"] for r in ROWS]
    assert [r.output for r in records] == [r["output"] for r in ROWS]
    assert [r.unit for r in records] == ["p1", "p2", "p1"]  # units from the person column


def test_by_person_groups_a_persons_records_into_one_unit(tmp_path):
    spec = SiteDataSpec(path=_write(tmp_path / "site.jsonl", "jsonl"))
    by_person = load_site_records(spec, by_person=True)
    by_record = load_site_records(spec, by_person=False)
    assert Counter(r.unit for r in by_person) == {"p1": 2, "p2": 1}
    assert len({r.unit for r in by_record}) == 3


def test_an_hf_folder_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    spec = SiteDataSpec(path=folder)
    assert spec.format == "hf"
    assert [r.unit for r in load_site_records(spec, by_person=True)] == ["p1", "p2", "p1"]


def test_an_hf_folder_without_datasets_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match=r"data-path=.*hf.*pip install datasets"):
        load_site_records(SiteDataSpec(path=tmp_path / "hf"), by_person=False)


def test_no_data_path_means_no_site_data():
    assert SiteDataSpec.from_node_config({"state-dir": "/x"}) is None
    with pytest.raises(ConfigError, match="data-format: given without data-path"):
        SiteDataSpec.from_node_config({"data-format": "csv"})


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"data-fields": "instruction"}, r"data-fields=.*'instruction' is not field=column"),
        ({"data-fields": "question=q"}, r"data-fields=.*unknown field 'question'"),
        ({"data-fields": "output=a,output=b"}, r"'output' is mapped twice"),
        ({"data-heldout-fraction": "half"}, r"data-heldout-fraction='half': not a number"),
        ({"data-heldout-fraction": 1.5}, r"data-heldout-fraction"),
        ({"data-format": "parquet"}, r"data-format"),
    ],
)
def test_node_config_errors_name_the_key(tmp_path, config, names):
    path = _write(tmp_path / "site.json", "json")
    with pytest.raises(ConfigError, match=names):
        SiteDataSpec.from_node_config({"data-path": str(path), **config})


def test_an_unknown_suffix_asks_for_the_format(tmp_path):
    path = tmp_path / "site.dat"
    path.write_text("x")
    with pytest.raises(ConfigError, match=r"node config data-format .*site\.dat.*set data-format"):
        SiteDataSpec.from_node_config({"data-path": str(path)})


def test_a_missing_column_names_the_file_the_column_and_the_fix(tmp_path):
    path = _write(tmp_path / "site.csv", "csv", [{"question": "q", "output": "a"}])
    with pytest.raises(ConfigError) as info:
        load_site_records(SiteDataSpec(path=path), by_person=False)
    message = str(info.value)
    assert "site.csv" in message and "'instruction'" in message and "line 2" in message
    assert "['output', 'question']" in message and "data-fields instruction=<column>" in message
    # The mapping is the fix it names.
    fixed = SiteDataSpec(path=path, fields={"instruction": "question"})
    assert load_site_records(fixed, by_person=False)[0].instruction == "q"


def test_a_later_record_missing_a_field_names_its_line(tmp_path):
    rows = [ROWS[0], {"instruction": "no answer"}]
    path = _write(tmp_path / "site.jsonl", "jsonl", rows)
    with pytest.raises(ConfigError, match=r"site\.jsonl.*line 2 has no 'output' column"):
        load_site_records(SiteDataSpec(path=path), by_person=False)


def test_the_person_column_is_required_under_user_level_dp(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "person"} for r in ROWS]
    path = _write(tmp_path / "site.json", "json", rows)
    assert len(load_site_records(SiteDataSpec(path=path), by_person=False)) == 3  # record-level needs none
    with pytest.raises(ConfigError, match=r"site\.json.*no column 'person' for our field 'person'.*user-level"):
        load_site_records(SiteDataSpec(path=path), by_person=True)
    blank = [ROWS[0], {**ROWS[1], "person": ""}]
    path = _write(tmp_path / "blank.json", "json", blank)
    with pytest.raises(ConfigError, match=r"blank\.json.*record 1 has no value in the person column 'person'"):
        load_site_records(SiteDataSpec(path=path), by_person=True)


def test_a_malformed_json_line_names_its_line(tmp_path):
    path = tmp_path / "site.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(ConfigError, match=r"data-path=.*site\.jsonl.*line 2 is not a JSON object"):
        load_site_records(SiteDataSpec(path=path), by_person=False)


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv"])
def test_an_empty_file_is_named(tmp_path, suffix):
    path = tmp_path / f"site.{suffix}"
    path.write_text("")
    with pytest.raises(ConfigError, match=rf"site\.{suffix}.*empty"):
        load_site_records(SiteDataSpec(path=path), by_person=False)


def test_csv_header_only_and_ragged_rows_are_named(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("instruction,output\n")
    with pytest.raises(ConfigError, match="a header but no records"):
        load_site_records(SiteDataSpec(path=path), by_person=False)
    path.write_text("instruction,output\nq,a\nq2\n")
    with pytest.raises(ConfigError, match="line 3 has fewer cells"):
        load_site_records(SiteDataSpec(path=path), by_person=False)
    path.write_text("instruction,output\nq,a,extra\n")
    with pytest.raises(ConfigError, match="line 2 has more cells"):
        load_site_records(SiteDataSpec(path=path), by_person=False)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data-path=.*nowhere\.json.*is not a file"):
        load_site_records(SiteDataSpec(path=tmp_path / "nowhere.json"), by_person=False)


def test_load_alpaca_still_reads_and_names_the_record(tmp_path):
    path = _write(tmp_path / "a.json", "json")
    assert load_alpaca(path) == ROWS
    path.write_text(json.dumps([ROWS[0], {"instruction": "x"}]))
    with pytest.raises(ConfigError, match=r"data\.path=.*record 1 needs 'instruction' and 'output'"):
        load_alpaca(path)


def _people(n, per):
    return [TextRecord(f"q{p}-{k}", "", f"a{p}-{k}", unit=f"person-{p}") for p in range(n) for k in range(per)]


def test_split_heldout_by_person_keeps_each_person_on_one_side():
    records = _people(20, 3)
    train, heldout = split_heldout(records, 0.25, by_person=True)
    assert len(train) + len(heldout) == len(records)
    train_people, held_people = {r.unit for r in train}, {r.unit for r in heldout}
    assert not train_people & held_people
    assert len(held_people) == 5 and len(heldout) == 15  # a quarter of the people, with all their records
    # A function of the unit ids: the same people are held out whatever the order, and a corrected
    # record stays on its side.
    _, again_held = split_heldout(list(reversed(records)), 0.25, by_person=True)
    assert {r.unit for r in again_held} == held_people
    target = heldout[0].instruction
    corrected = [r if r.instruction != target else TextRecord("fixed", "", "x", r.unit) for r in records]
    assert {r.unit for r in split_heldout(corrected, 0.25, by_person=True)[1]} == held_people


def test_split_heldout_by_record_splits_a_persons_records():
    """The control: without by_person, a person's records land on both sides (what user-level DP forbids)."""
    records = _people(4, 10)
    train, heldout = split_heldout(records, 0.5, by_person=False)
    assert len(heldout) == 20
    assert {r.unit for r in train} & {r.unit for r in heldout}


def test_split_heldout_bounds():
    records = _people(3, 1)
    assert split_heldout(records, 0.0, by_person=True) == (records, [])
    train, heldout = split_heldout(records, 0.01, by_person=True)
    assert len(heldout) == 1  # at least one unit when asked for any
    train, heldout = split_heldout(records, 0.99, by_person=True)
    assert len(train) == 1  # at least one unit left to train on
    with pytest.raises(ConfigError, match="at least two"):
        split_heldout(_people(1, 5), 0.5, by_person=True)
    with pytest.raises(ConfigError, match=r"data-heldout-fraction=1\.0"):
        split_heldout(records, 1.0, by_person=True)
