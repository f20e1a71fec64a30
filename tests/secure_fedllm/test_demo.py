from __future__ import annotations

import sys

import pytest

from secure_fedllm import ConfigError, DemoConfig, run_demo
from secure_fedllm.cli import main


def test_demo_reveals_the_sum_within_its_bound():
    figures = run_demo(DemoConfig(clients=8, dimension=5_000, dropout=0.25))
    assert figures["rel_l2_error"] < 1e-5
    assert 4.0 <= figures["upload_bytes_per_param"] < 5.0


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("clients", {"clients": 2}), ("protocol", {"protocol": "he"}), ("dropout", {"dropout": 0.7})],
)
def test_bad_demo_config_names_the_field(field, kwargs):
    with pytest.raises(ConfigError, match=field):
        run_demo(DemoConfig(**kwargs))


def test_cli_demo_prints_the_round(capsys):
    assert main(["demo", "--clients", "6", "--dimension", "1000", "--protocol", "secagg"]) == 0
    out = capsys.readouterr().out
    assert "sum revealed over" in out and "secagg: n=6" in out


def test_cli_reports_config_errors(capsys):
    assert main(["demo", "--clients", "2"]) == 2
    assert "clients=2" in capsys.readouterr().err


def test_secure_fedllm_does_not_import_flower_or_threat_models():
    import subprocess

    code = (
        "import sys, secure_fedllm, secure_fedllm.cli, secure_fedllm.federation; "
        "bad = [m for m in sys.modules if m.startswith(('flwr', 'threat_models'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
