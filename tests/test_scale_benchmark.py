"""Smoke test of benchmarks/scale.py: one tiny round end to end, the server in its own process.

The benchmark itself (n up to 1000, d = 1e6) is far too slow for the suite; this runs its real code
path (wire bytes over a pipe to `--serve`, the pool-driven unmask, the oracle check of the decoded
sum) at n = 10, d = 1000, so a change that breaks the script fails here rather than on the rerun.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale


@pytest.mark.parametrize("workers", [1, 2])
def test_one_tiny_round_runs_and_reports_every_field(workers: int) -> None:
    row = scale.run_ours(10, "semi-honest", 1000, workers, seed=1, profile_dir=None)
    for key in ("impl", "setting", "n", "k", "t", "server_s", "client_s", "client_to_limit"):
        assert key in row
    assert row["n"] == 10 and row["dropped"] == 1 and row["server_peak_rss_mb"] > 0
    assert row["max_abs_error"] <= row["error_bound"]  # run_ours raises otherwise; checked again here
    assert row["upload_bytes_per_client"] > 4 * 1000


def test_the_fitted_exponent_recovers_a_power_law() -> None:
    rows = [{"n": n, "server_s": 0.5 * n**1.5} for n in (100, 300, 1000)]
    assert scale.fitted_exponent(rows) == pytest.approx(1.5)
