"""A user's first hour: the dry run, truncation warnings, piped and JSON output, --quiet, choices, plots.

The dry run must predict what the run spends (it goes through the run's own calibration and
ledger composition), so one tiny run is compared with the dry run of its own config. That run is
piped (stdout is not a terminal), writes a JSON log, and uses a data.max_length that truncates most
records, so the same run also shows the plain output, the JSON lines and the warning.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.ticker import MaxNLocator

from secure_fedllm import ConfigError, RunConfig, run
from secure_fedllm.cli import main
from secure_fedllm.config import ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.data.chat import IGNORE_INDEX
from secure_fedllm.data.tokenized import (
    DataTruncationWarning,
    LengthStats,
    check_has_records,
    max_length_warning,
)
from secure_fedllm.federation.dry_run import dry_run, format_dry_run
from secure_fedllm.federation.record import RoundRecord
from secure_fedllm.federation.report import costs_figure, epsilon_figure, epsilon_groups, quality_figure
from secure_fedllm.federation.runner import check_data_fits
from secure_fedllm.logs import RunLog, quiet_libraries
from secure_fedllm.models import load_tokenizer

LONG = "a-folder-name-long-enough-that-the-start-line-passes-eighty-columns"


def tiny_sets(model_dir: Path, *extra: str, max_length: int = 96, rounds: int = 2) -> list[str]:
    """A tiny federation; max_length=96 truncates most of the synthetic records and drops some."""
    return [
        f'model.name="{model_dir}"',
        "federation.clients=3",
        f"federation.rounds={rounds}",
        "federation.local_steps=1",
        "data.records_per_client=40",
        f"data.max_length={max_length}",
        "evaluation.heldout_records=8",
        "evaluation.generations=0",
        "privacy.expected_batch_size=4",
        "lora.r=2",
        "privacy.noise_seed=11",
        'privacy.accountant="rdp"',  # the tight PLD accountant would take most of the test's time
        "secure_aggregation.dropout_rate=0.0",
        *extra,
    ]


def argv_of(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def piped(tiny_model_dir, tmp_path_factory):
    """One tiny run through the console entry, stdout and stderr captured (not terminals), with --log-json."""
    root = tmp_path_factory.mktemp("first-hour")
    out = root / LONG / "run"
    log = root / "log.jsonl"
    sets = tiny_sets(tiny_model_dir)
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        status = main(["run", "--out", str(out), "--log-json", str(log), *argv_of(sets)])
    assert status == 0, stderr.getvalue()
    return {"config": RunConfig().with_overrides(sets), "out": out, "log": log,
            "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}  # fmt: skip


# -- truncation statistics ---------------------------------------------------------------------


def test_tokenization_counts_truncated_and_dropped_records(tiny_model_dir):
    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    whole = ChatTemplate(tokenizer, system_prompt="", max_length=10_000)
    max_length = len(whole.prompt_ids("Say hi")) + 12
    records = (
        [TextRecord("Say hi", "", "ok", unit=f"fits-{i}") for i in range(5)]
        + [TextRecord("Say hi", "", "word " * 50, unit=f"cut-{i}") for i in range(3)]
        + [TextRecord("please " * 60, "", "ok", unit=f"drop-{i}") for i in range(2)]
    )
    prompts = [len(whole.prompt_ids(r.instruction, r.input)) for r in records]
    lengths = [whole.encode(r.instruction, r.input, r.output)[1] for r in records]
    # the records were built to fall 5 / 3 / 2 into fits / truncated / dropped
    assert sum(n <= max_length for n in lengths) == 5
    assert sum(p < max_length < n for p, n in zip(prompts, lengths, strict=True)) == 3
    assert sum(p >= max_length for p in prompts) == 2

    data = TokenizedDataset.build(records, ChatTemplate(tokenizer, system_prompt="", max_length=max_length))
    stats = data.stats
    assert stats is not None
    assert (stats.records, stats.truncated, stats.dropped, data.dropped) == (10, 3, 2, 2)
    assert stats.lengths == tuple(lengths) and stats.max_length == max_length
    assert data.num_units == 8 and len(data.examples) == 8
    cut = [e for e in data.examples if len(e.input_ids) == max_length]
    assert len(cut) == 3 and all(e.labels[-1] != IGNORE_INDEX for e in cut)
    assert stats.affected_fraction == pytest.approx(0.5)
    message = max_length_warning([stats])
    assert message is not None and f"data.max_length={max_length}" in message
    assert f"set data.max_length={stats.suggested_max_length()}" in message
    assert stats.suggested_max_length() >= stats.percentile(95) > max_length


def _stats(records: int, truncated: int, dropped: int = 0, *, max_length: int = 64) -> LengthStats:
    lengths = [40] * (records - truncated - dropped) + [80] * (truncated + dropped)
    return LengthStats(max_length, tuple(lengths), truncated, dropped)


def test_the_warning_fires_above_ten_percent_and_not_below():
    assert max_length_warning([_stats(100, 10)]) is None  # exactly 10%: not above
    assert max_length_warning([_stats(100, 5, 5)]) is None
    message = max_length_warning([_stats(100, 11)])
    assert message is not None
    assert message.startswith("data.max_length=64 truncates the response of 11 of 100 records (11%)")
    assert "set data.max_length=80" in message  # the 95th percentile (80 tokens), a multiple of 16
    message = max_length_warning([_stats(100, 6, 5)])  # 11% lost text: 6 cut, 5 dropped
    assert message is not None and "drops 5 (5%)" in message
    # one client over 10% is named even when the whole federation is under it
    message = max_length_warning([_stats(100, 0), _stats(100, 0), _stats(10, 5)])
    assert message is not None and "over 10% at client 2 (client 2: 50%)" in message

    def dataset(stats: LengthStats) -> TokenizedDataset:
        return TokenizedDataset([], [[0]], pad_id=0, stats=stats)

    with pytest.warns(DataTruncationWarning, match=r"data\.max_length=64 .* set data\.max_length=80"):
        check_data_fits(RunConfig(), [dataset(_stats(100, 11)), dataset(_stats(100, 0))], None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataTruncationWarning)
        check_data_fits(RunConfig(), [dataset(_stats(100, 10)), dataset(_stats(100, 0))], None)


def test_a_client_with_no_record_left_is_a_config_error_naming_max_length(tiny_model_dir, tmp_path):
    # Every prompt longer than data.max_length: each client is left with no privacy unit. That used to
    # reach the sampling rate as N_i = 0 (ZeroDivisionError); now it is refused with the value to set.
    sets = tiny_sets(tiny_model_dir, f'data.system_prompt="{"background " * 40}"', max_length=32)
    config = RunConfig().with_overrides(sets)
    expected = r"client 0: all 40 records are dropped .* data\.max_length=32 .* set data\.max_length=\d+"
    with pytest.raises(ConfigError, match=expected):
        dry_run(config)
    with pytest.raises(ConfigError, match=expected):
        run(config, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.toml").exists()
    with pytest.raises(ConfigError, match="client 3: has no records"):
        check_has_records(LengthStats(64), "client 3")


# -- the dry run -------------------------------------------------------------------------------


def test_the_dry_run_predicts_what_the_run_spends(piped):
    out, config = piped["out"], piped["config"]
    assert RunConfig.from_file(out / "config.toml") == config
    plan = dry_run(config)
    ledgers = {}
    for path in sorted(out.with_name(out.name + ".sites").glob("client-*/ledgers/*.json")):
        ledger = json.loads(path.read_text())
        ledgers[ledger["client"]] = ledger
    report = (out / "report.md").read_text()
    table = {int(m[0]): m[1:] for m in re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", report, re.M)}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(plan.rows) == 3 and sorted(ledgers) == [0, 1, 2]
    assert len({r.units for r in plan.rows}) > 1  # the clients differ, so a mix-up of clients would show
    for row in plan.rows:
        ledger = ledgers[row.client]
        events = ledger["events"]
        assert len(events) == row.joins == 2
        for event in events:
            assert event["noise_multiplier"] == row.noise_multiplier
            assert event["sample_rate"] == row.sample_rate
            assert event["steps"] == row.steps
        assert ledger["delta"] == row.delta
        assert math.isclose(metrics[-1]["epsilon"][str(row.client)], row.epsilon, rel_tol=1e-12)
        assert table[row.client] == (str(row.units), f"{row.sample_rate:.4f}", f"{row.noise_multiplier:.4f}")
    text = format_dry_run(plan)
    assert "warning: data.max_length=96 truncates" in text and "drop --dry-run to run" in text
    for row in plan.rows:
        assert re.search(rf"^\s+{row.client}\s+40\s+{row.truncated} \(\d+%\)\s+{row.dropped} \(\d+%\)\s+{row.units}\s",
                         text, re.M)  # fmt: skip
    assert plan.stats.truncated + plan.stats.dropped == sum(r.truncated + r.dropped for r in plan.rows)
    assert sum(r.dropped for r in plan.rows) == sum(40 - r.units for r in plan.rows) > 0


def test_dry_run_on_the_command_line_prints_the_table_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "dry.jsonl"
    argv = ["run", "--dry-run", "--out", str(out), "--log-json", str(log), *argv_of(tiny_sets(tiny_model_dir))]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("dry run: 3 clients, 2 rounds")
    assert re.search(r"^client\s+records\s+truncated\s+dropped\s+N_i\s+q_i\s+noise\s+steps\s+joins\s+delta\s+epsilon$",
                     printed, re.M)  # fmt: skip
    assert "warning: data.max_length=96" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dry.jsonl"]  # no run folder, no sites folder
    (event,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert event["event"] == "dry_run" and len(event["clients"]) == 3
    assert event["truncated"] == sum(c["truncated"] for c in event["clients"])


def test_log_json_dash_puts_json_alone_on_stdout(tiny_model_dir, tmp_path, capsys):
    argv = ["run", "--dry-run", "--log-json", "-", *argv_of(tiny_sets(tiny_model_dir, max_length=160))]
    assert main(argv) == 0
    captured = capsys.readouterr()
    (event,) = [json.loads(line) for line in captured.out.splitlines()]
    assert event["event"] == "dry_run" and event["warning"] is None and event["truncated"] == 0
    assert captured.err.startswith("dry run: 3 clients") and "warning:" not in captured.err


# -- output that is not a terminal; JSON lines --------------------------------------------------


def test_piped_output_is_plain_lines_never_wrapped(piped):
    stdout, out = piped["stdout"], piped["out"]
    assert "\x1b" not in stdout and "\r" not in stdout
    lines = stdout.splitlines()
    start = next(line for line in lines if line.startswith("secure-fedllm (in-process)"))
    assert start.endswith(f"-> {out}") and len(start) > 80
    assert [line for line in lines if line.startswith("round ")][-1].startswith("round 2:")
    assert lines[-1] == f"run folder: {out}"
    for line in lines:  # a line rich wrapped at 80 columns would leave a fragment that starts no known line
        assert line.startswith(("secure-fedllm", "round ", "final ", "held-out ", "run folder: ")), line


def test_rich_wraps_at_eighty_columns_where_the_plain_log_does_not():
    text = "secure-fedllm (in-process) " + "x" * 100 + " -> /a/long/run/folder"
    plain = io.StringIO()
    RunLog(stream=plain).line(text)
    assert plain.getvalue() == text + "\n"
    # the control: what the runner did before (a rich Console writing to a file) breaks the line
    from rich.console import Console

    wrapped = io.StringIO()
    Console(file=wrapped).print(text, highlight=False)
    assert wrapped.getvalue() != text + "\n" and max(len(x) for x in wrapped.getvalue().splitlines()) <= 80


def test_log_json_writes_one_parsable_object_per_event(piped):
    events = [json.loads(line) for line in piped["log"].read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "warning" and kinds[-1] == "result"
    assert events[0]["category"] == "DataTruncationWarning" and "data.max_length=96" in events[0]["message"]
    assert [e["round"] for e in events if e["event"] == "round"] == [0, 1, 2]
    assert [e["message"] for e in events if e["event"] == "log"] == [
        line for line in piped["stdout"].splitlines() if not line.startswith(("held-out perplexity", "run folder"))
    ]
    result = events[-1]
    assert result["out"] == str(piped["out"]) and result["rounds"] == 3
    rounds = [e for e in events if e["event"] == "round"]
    assert result["epsilon"] == rounds[-1]["epsilon"]
    assert all(isinstance(e["time"], float) for e in events)


def test_the_truncation_warning_is_one_line_on_stderr(piped):
    lines = [line for line in piped["stderr"].splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1
    assert lines[0].startswith("warning: data.max_length=96 truncates the response of ")
    assert lines[0].endswith(
        "set data.max_length=144 (95% of the records are at most 143 tokens) or shorten the prompts"
    )


def test_quiet_silences_library_progress_bars_and_restores_them(capsys, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled
    from huggingface_hub.utils import tqdm as hub_tqdm
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for _ in hf_logging.tqdm(range(2), desc="Loading weights"):  # the control: bars print outside the block
        pass
    assert "Loading weights" in capsys.readouterr().err
    with quiet_libraries():
        for _ in hf_logging.tqdm(range(2), desc="Loading weights"):
            pass
        for _ in hub_tqdm(range(2), desc="Fetching files"):
            pass
        hf_logging.get_logger("transformers.modeling_utils").warning("a library warning")
        assert os.environ["TQDM_DISABLE"] == "1"
        assert logging.getLogger("peft").level == logging.ERROR
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Fetching files" not in err and "a library warning" not in err
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert "TQDM_DISABLE" not in os.environ


def test_run_quiet_prints_only_its_result(tiny_model_dir, tmp_path, capsys, piped):
    out = tmp_path / "run"
    sets = tiny_sets(tiny_model_dir, "privacy.mechanism='none'", max_length=160, rounds=1)  # no calibration: fast
    argv = ["run", "--quiet", "--out", str(out), *argv_of(sets)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("held-out perplexity ratio (final / round 0): ")
    assert lines[1] == f"run folder: {out}"
    assert "it/s" not in captured.err and "Loading weights" not in captured.err
    # Piped output (not a terminal) is free of library bars too, --quiet or not; that they print
    # outside `quiet_libraries` is the control of test_quiet_silences_library_progress_bars_and_restores_them.
    assert "Loading weights" not in piped["stderr"] and "it/s" not in piped["stderr"]


# -- choices -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "choices"),
    [
        (["run", "--help"], ["[inprocess|flower]"]),
        (["budget", "plan", "--help"], ["[pld|rdp|prv]", "[replace|add_remove]", "[local|distributed]"]),
        (["demo", "--help"], ["[secagg|secagg+]"]),
    ],
)
def test_enumerated_options_are_choices_in_help(argv, choices, capsys):
    assert main(argv) == 0
    text = capsys.readouterr().out
    for choice in choices:
        assert choice in text
    if argv[0] == "run":
        assert "--dry-run" in text and "--log-json" in text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--engine", "warp"], "secure-fedllm run: invalid value for '--engine': 'warp' is not one of "
         "'inprocess', 'flower'; see `secure-fedllm run --help`"),
        (["budget", "plan", "--accountant", "moments"], "'moments' is not one of 'pld', 'rdp', 'prv'"),
        (["budget", "plan", "--neighbouring", "swap"], "'swap' is not one of 'replace', 'add_remove'"),
        (["budget", "plan", "--mode", "central"], "'central' is not one of 'local', 'distributed'"),
        (["demo", "--protocol", "he"], "'he' is not one of 'secagg', 'secagg+'"),
    ],
)  # fmt: skip
def test_a_bad_choice_is_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
    assert "Traceback" not in captured.err


def test_choices_reach_the_commands_as_their_values(capsys):
    assert main(["budget", "plan", "--epsilon", "4", "--accountant", "rdp", "--neighbouring", "add_remove",
                 "--json"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert (plan["accountant"], plan["neighbouring"]) == ("rdp", "add_remove")
    assert main(["demo", "--clients", "4", "--dimension", "100", "--protocol", "secagg"]) == 0
    assert "secagg: n=4" in capsys.readouterr().out


# -- plots -------------------------------------------------------------------------------------


def _rows() -> list[RoundRecord]:
    same = [0.0, 5.0, 8.0]
    return [RoundRecord(round=r, eval_loss=1.0, perplexity=2.7, epsilon={0: same[r], 1: same[r], 2: [0.0, 3.0, 6.0][r]})
            for r in range(3)]  # fmt: skip


def _round_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if low <= t <= high]


def test_plots_have_integer_round_ticks():
    rows = _rows()
    figures = [epsilon_figure(rows, 8.0), quality_figure(rows), costs_figure(rows)]
    try:
        for fig in figures:
            fig.canvas.draw()
            for ax in fig.axes:
                assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
                ticks = _round_ticks(ax)
                assert ticks and all(t.is_integer() for t in ticks), ticks
        # the control: matplotlib's default locator puts fractional ticks on three rounds
        fig, ax = plt.subplots()
        figures.append(fig)
        ax.plot([0, 1, 2], [0.0, 5.0, 8.0])
        fig.canvas.draw()
        assert not all(t.is_integer() for t in _round_ticks(ax))
    finally:
        for fig in figures:
            plt.close(fig)


def test_identical_epsilon_curves_are_one_labelled_line_and_others_distinguishable():
    rows = _rows()
    assert epsilon_groups(rows) == [([0, 1], [0.0, 5.0, 8.0]), ([2], [0.0, 3.0, 6.0])]
    fig = epsilon_figure(rows, 8.0)
    try:
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["clients 0, 1 (identical)", "client 2", "budget"]
        first, second = ax.get_lines()[:2]
        assert first.get_color() != second.get_color()
        assert first.get_linestyle() != second.get_linestyle() and first.get_marker() != second.get_marker()
    finally:
        plt.close(fig)
    distinct = [RoundRecord(round=r, epsilon={c: r * (1.0 + c / 10) for c in range(5)}) for r in range(2)]
    assert [clients for clients, _ in epsilon_groups(distinct)] == [[0], [1], [2], [3], [4]]


def test_the_report_names_a_target_module_preset_as_written(piped):
    report = (piped["out"] / "report.md").read_text()
    target = piped["config"].lora.target_modules
    assert isinstance(target, str)
    assert f"r=2 on {target};" in report
