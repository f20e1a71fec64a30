"""One error path for the console script: a user error is one line, `error: <where>: <problem>; <fix>`, exit 2.

Usage errors come from click, which typer runs on (the `click` package in older typers, a vendored
`typer._click` in newer ones); the console entry catches them itself, so these hold whatever typer
is installed. Bugs keep their traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import secure_fedllm.cli as core_cli
from secure_fedllm import ConfigError, RunConfig
from secure_fedllm_cli import main

ROOT = Path(__file__).resolve().parents[2]


def error_line(capsys: pytest.CaptureFixture[str], *, last: bool = False) -> str:
    """The one `error:` line on stderr (with `last`, the last line: model loading may print progress first)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    if not last:
        assert len(lines) == 1, err
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def test_version_and_help_exit_zero(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "secure-fedllm 0.1.0"
    for flag in ("-h", "--help"):
        assert main([flag]) == 0
        out = capsys.readouterr().out
        for command in ("run", "init-config", "budget", "demo", "evaluate"):
            assert command in out
    assert main(["budget", "-h"]) == 0
    out = capsys.readouterr().out
    assert "plan" in out and "show" in out
    assert main(["run", "-h"]) == 0
    assert "--resume" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--cofnig", "x.toml"], "secure-fedllm run: no such option --cofnig (did you mean --config?); see"),
        (["evaluate"], "secure-fedllm evaluate: missing option '--out'; see `secure-fedllm evaluate --help`"),
        (["budget", "plan", "--epsilon"], "option '--epsilon' requires an argument"),
        (["demo", "--clients", "many"], "secure-fedllm demo: invalid value for '--clients'"),
        (["frobnicate"], "secure-fedllm: no such command 'frobnicate'; see `secure-fedllm --help`"),
        ([], "secure-fedllm: missing command; see `secure-fedllm --help`"),
        (["budget"], "secure-fedllm budget: missing command; see `secure-fedllm budget --help`"),
        (["budget", "show"], "secure-fedllm budget show: give a run folder or --state-dir"),
        (["run", "--engine", "warp"], "invalid value for '--engine': 'warp' is not one of 'inprocess', 'flower'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    line = error_line(capsys)
    assert expected in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--cofnig", "x.toml"], "error: secure-fedllm run: no such option --cofnig"),
        (["budget", "show"], "error: secure-fedllm budget show: give a run folder or --state-dir"),
    ],
)
def test_the_console_script_prints_no_traceback(argv, expected):
    done = subprocess.run(
        [sys.executable, "-m", "secure_fedllm_cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(expected) and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_help_and_version_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "secure_fedllm_cli", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "secure-fedllm 0.1.0", "")


def test_malformed_toml_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('kind = "secure-fedllm.run"\n[federation\nrounds = 3\n')
    assert main(["run", "--config", str(path)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: malformed TOML: ")
    assert "line 2" in line and line.endswith("; fix the syntax there")


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  rounds: 3\n   clients: [\n")
    assert main(["run", "--config", str(path)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: malformed YAML at line 3, column 11: ")
    assert line.endswith("; fix the syntax there")


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{\n "federation": {"rounds": 3,}\n}')
    with pytest.raises(ConfigError, match=rf"^{path}: malformed JSON at line 2, column \d+: "):
        RunConfig.from_file(path)


def test_an_unknown_key_names_the_file_and_the_key(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("[privacy]\nmax_grad_nrom = 1.0\n")
    assert main(["run", "--config", str(path)]) == 2
    assert error_line(capsys) == (
        f"error: {path}: privacy.max_grad_nrom: unknown key; check its spelling against `secure-fedllm init-config`"
    )


def test_a_missing_config_file_is_named(tmp_path, capsys):
    path = tmp_path / "absent.toml"
    assert main(["run", "--config", str(path)]) == 2
    assert error_line(capsys) == f"error: {path}: cannot read the config (No such file or directory); check the path"


def test_every_invalid_field_on_one_line(capsys):
    assert main(["run", "--set", "lora.r=0", "--set", "federation.rounds=0"]) == 2
    line = error_line(capsys)
    assert "lora.r: Input should be greater than or equal to 1" in line
    assert "federation.rounds: Input should be greater than or equal to 1" in line
    assert line.endswith("; see `secure-fedllm init-config` for every field")


def test_a_max_length_with_no_room_for_a_response_is_refused_by_name(capsys):
    # It used to reach the sampling rate as 0 privacy units: ZeroDivisionError after loading the model.
    with pytest.raises(ConfigError, match=r"data.max_length: Input should be greater than or equal to 32"):
        RunConfig().with_overrides(["data.max_length=16"])
    assert RunConfig().with_overrides(["data.max_length=32"]).data.max_length == 32
    assert main(["run", "--set", "data.max_length=16"]) == 2
    assert error_line(capsys) == (
        "error: data.max_length: Input should be greater than or equal to 32; "
        "see `secure-fedllm init-config` for every field"
    )


def test_an_unwritable_output_folder_is_named(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"  # a file where a folder must go: refused even to root, unlike chmod
    blocker.write_text("not a folder")
    out = blocker / "run"
    argv = ["run", "--quiet", "--out", str(out), "--set", f'model.name="{tiny_model_dir}"']
    for setting in (
        "data.max_length=160",
        "data.records_per_client=64",
        "secure_aggregation.dropout_rate=0.0",
        "privacy.mechanism='none'",
    ):
        argv += ["--set", setting]
    assert main(argv) == 2
    line = error_line(capsys, last=True)
    assert f"error: {blocker}" in line and "Not a directory" in line
    assert line.endswith("an output folder writable)")


def test_init_config_into_a_missing_folder_is_named(tmp_path, capsys):
    path = tmp_path / "no" / "such" / "folder" / "c.toml"
    assert main(["init-config", str(path)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: No such file or directory; check the path")


def test_a_corrupted_ledger_names_its_file(tmp_path, capsys):
    state = tmp_path / "site"
    (state / "ledgers").mkdir(parents=True)
    (state / "site.json").write_text("{}")
    ledger = state / "ledgers" / "population.json"
    ledger.write_text('{"version": 2, "events": [')
    assert main(["budget", "show", "--state-dir", str(state)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {ledger}: not a readable privacy ledger")
    assert "restore it from a backup" in line


def test_a_corrupted_checkpoint_names_its_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    RunConfig().to_file(run_dir / "config.toml")
    state = run_dir / "checkpoint" / "state.json"
    state.write_text('{"round": 1, "vec')
    assert main(["run", "--quiet", "--resume", str(run_dir), "--sites", str(tmp_path / "sites")]) == 2
    line = error_line(capsys, last=True)
    assert line.startswith(f"error: {state}: not a checkpoint state")
    assert not (tmp_path / "sites").exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(**_: object) -> dict[str, object]:
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(core_cli, "plan_budget", broken)
    with pytest.raises(ZeroDivisionError):
        main(["budget", "plan", "--epsilon", "8"])

    def no_path(**_: object) -> dict[str, object]:
        raise OSError("an OSError that names no path the user gave")

    monkeypatch.setattr(core_cli, "plan_budget", no_path)
    with pytest.raises(OSError, match="names no path"):
        main(["budget", "plan", "--epsilon", "8"])


def test_a_threat_model_error_is_a_user_error(monkeypatch, capsys):
    from threat_models import cli as threat_cli
    from threat_models import evaluation
    from threat_models.errors import AttackConfigError

    def refuse(*_: object, **__: object) -> None:
        raise AttackConfigError("evaluate --seed: seeds above 9 are not calibrated; use 0..9")

    monkeypatch.setattr(evaluation, "evaluate", refuse)
    assert threat_cli.evaluate.__module__ == "threat_models.cli"
    assert main(["evaluate", "--out", "unused", "--seed", "12"]) == 2
    assert error_line(capsys) == "error: evaluate --seed: seeds above 9 are not calibrated; use 0..9"
    # secure_fedllm's own entry knows nothing of threat_models: the same error there is not its user error.
    assert "evaluate" not in {c.name for c in core_cli.app.registered_commands}


def test_the_console_script_assembles_both_packages_without_either_touching_the_other():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["secure-fedllm"] == "secure_fedllm_cli:main"
    code = (
        "import sys, secure_fedllm.cli as c; "
        "assert not [m for m in sys.modules if m.startswith(('threat_models', 'secure_fedllm_cli'))]; "
        "import threat_models.cli; "
        "assert not hasattr(threat_models.cli, 'app') and not hasattr(threat_models.cli, 'main'); "
        "print(json.dumps(sorted(x.name for x in c.app.registered_commands)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json; " + code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == [
        "demo",
        "init-config",
        "run",
        "tiny-model",
    ]  # importing threat_models added nothing


def test_python_m_secure_fedllm_cli_still_runs_its_own_commands(capsys):
    assert core_cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("secure-fedllm ")
    assert core_cli.main(["evaluate"]) == 2  # not one of secure_fedllm's commands
    assert "no such command 'evaluate'" in error_line(capsys)
