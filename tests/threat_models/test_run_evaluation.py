"""`secure-fedllm evaluate --run`: attacks on a user's own run folder, on tiny-model runs built once per module.

The control is an overfit adapter: trained to memorise the run's own training records, membership
inference must separate them from the run's held-out records (AUC well above chance). That test
fails if the evaluation re-derived any other split, so it is also the check that members and
non-members are the run's.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_fedllm import RunConfig, load_adapter, run
from secure_fedllm.data import ChatTemplate, TokenizedDataset, load_federation_data, synthesize_federation
from secure_fedllm.federation import RunPaths
from secure_fedllm_cli import main as cli_main
from threat_models import RunDataUnavailableError, RunEvaluation, RunEvaluationError, evaluate_run
from threat_models.run_evaluation import _Progress, dp_auc_bound
from threat_models.stats import dp_tpr_bound

REFERENCES = 300
"""Reference secrets per canary format in these tests (10,000 in a real evaluation)."""


def _texts(records):
    return {(r.instruction, r.input, r.output) for r in records}


@pytest.fixture(scope="module")
def synthetic_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DP run on synthetic data with its planted canaries (x1, x4, x16 per format)."""
    root = tmp_path_factory.mktemp("run-eval") / "run"
    config = RunConfig.from_dict(
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {"records_per_client": 32, "max_length": 256},
            "federation": {"clients": 4, "rounds": 1, "local_steps": 1},
            "evaluation": {"heldout_records": 40, "generations": 0},
        }
    )
    run(config, out=root, progress=False)
    return root


@pytest.fixture(scope="module")
def evaluated(synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunEvaluation, str]:
    stream = io.StringIO()
    out = tmp_path_factory.mktemp("run-eval-out") / "report"
    evaluation = evaluate_run(synthetic_run, out=out, seed=3, stream=stream, canary_references=REFERENCES)
    return evaluation, stream.getvalue()


def _write_records(path: Path, count: int, seed: int) -> None:
    """`count` distinct Alpaca records (one per fictional person, so no text repeats)."""
    records = synthesize_federation(1, count, seed=seed, records_per_person=1, canary_repeats=()).clients[0]
    path.write_text("".join(json.dumps({"instruction": r.instruction, "output": r.output}) + "\n" for r in records))


@pytest.fixture(scope="module")
def file_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run without DP on a JSON-lines file (one client, no secure aggregation): the control's base."""
    folder = tmp_path_factory.mktemp("run-eval-file")
    data = folder / "records.jsonl"
    _write_records(data, 64, seed=7)
    config = RunConfig.from_dict(
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {"source": "file", "path": str(data), "max_length": 256},
            "federation": {"clients": 1, "rounds": 1, "local_steps": 1},
            "privacy": {"mechanism": "none"},
            "secure_aggregation": {"protocol": "none"},
            "evaluation": {"heldout_records": 32, "generations": 0},
        }
    )
    run(config, out=folder / "run", progress=False)
    return folder / "run"


def _copy_run(run_dir: Path, where: Path) -> Path:
    target = where / run_dir.name
    shutil.copytree(run_dir, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# The evaluation of a DP run
# ---------------------------------------------------------------------------------------------------------------


def test_members_and_nonmembers_are_the_runs_training_and_heldout_records(evaluated, synthetic_run):
    evaluation, _ = evaluated
    config = RunConfig.from_file(synthetic_run / "config.toml")
    # the generator's records, re-derived here independently of the evaluation
    federation = synthesize_federation(4, 32, seed=config.federation.seed)
    heldout = synthesize_federation(1, 40, seed=config.federation.seed + 1_000_003, canary_repeats=()).clients[0]
    canary_outputs = {c.prefix + c.secret for c in federation.canaries}
    training = [r for client in federation.clients for r in client]
    members = _texts(r for r in training if r.output not in canary_outputs)
    nonmembers = _texts(heldout) - members
    data = evaluation.data
    assert data.training_records == 4 * 32 and data.heldout_records == 40
    assert data.excluded["canary records"] == sum(c.repeats for c in federation.canaries) == 2 * (1 + 4 + 16)
    assert data.members_available == len(members)
    assert data.nonmembers_available == len(nonmembers)
    # balanced: the larger side subsampled to the smaller
    assert data.members == data.nonmembers == min(len(members), len(nonmembers))
    assert evaluation.membership.members == evaluation.membership.nonmembers == data.members
    assert set(evaluation.membership.reports) == {"loss", "zlib", "min_k", "reference"}
    assert any("equal data_manifest.json" in check for check in data.checks)
    assert any("equals round 0's recorded" in check for check in data.checks)
    assert not evaluation.warnings


def test_what_the_epsilon_allows_per_client_and_per_canary(evaluated, synthetic_run):
    evaluation, _ = evaluated
    last = RunPaths(synthetic_run).read_metrics()[-1]
    assert len(evaluation.clients) == 4
    for client in evaluation.clients:
        assert client.epsilon == pytest.approx(last.epsilon[client.client])
        assert client.delta == pytest.approx(0.1 / client.units)  # the default policy: delta = 0.1 / N_i
        # the bound comes from the client's whole privacy profile: never above the one-pair line, and far below it
        one_pair = dp_tpr_bound(0.01, epsilon=client.epsilon, delta=client.delta)
        assert client.bound_curve is not None
        assert 0.01 <= client.tpr_bounds["1%"] <= one_pair + 1e-9
        assert client.tpr_bounds["1%"] < 0.5 * one_pair
        assert 0.5 <= client.auc_bound < dp_auc_bound(client.epsilon, client.delta)
        fpr, tpr = client.bound_curve
        assert client.tpr_bounds["1%"] == pytest.approx(float(np.interp(0.01, fpr, tpr)))
    by_id = {c.canary_id: c for c in evaluation.canaries}
    manifest = json.loads((synthetic_run / "data_manifest.json").read_text())["canaries"]
    assert set(by_id) == {c["canary_id"] for c in manifest}
    for canary in manifest:
        found = by_id[canary["canary_id"]]
        eps = evaluation.clients[canary["client"]].epsilon
        assert found.repeats == canary["repeats"]
        assert found.group_epsilon == pytest.approx(canary["repeats"] * eps)  # group privacy over the copies
        assert found.p_chance == pytest.approx(2.0**-found.exposure)
        assert found.candidates == REFERENCES + 1
    x16 = next(c for c in evaluation.canaries if c.repeats == 16)
    assert f"does not bound a canary repeated 16 times: group privacy over its copies gives epsilon {16 * eps:.3g}" in (
        x16.meaning
    )


def test_dp_auc_bound_is_the_area_under_the_tradeoff_curve():
    assert dp_auc_bound(0.0, 0.0) == pytest.approx(0.5, abs=1e-6)
    # epsilon 1, delta 0: the curve min(e x, 1 - (1 - x)/e) crosses at x = 1/(1+e); area 1 - 1/(2(1+e)) - ...
    e = math.e
    cross = 1 / (1 + e)
    exact = e * cross**2 / 2 + (1 - cross) - ((1 - cross) ** 2) / (2 * e)
    assert dp_auc_bound(1.0, 0.0) == pytest.approx(exact, abs=1e-6)
    assert dp_auc_bound(math.inf, 0.0) == 1.0
    assert dp_auc_bound(8.0, 1e-5) > 0.999


def test_report_says_what_the_numbers_mean_and_that_intervals_are_wide(evaluated):
    evaluation, _ = evaluated
    report = Path(evaluation.report).read_text()
    n = evaluation.data.members
    assert f"Fewer than 1,000 records per side ({n} members, {n} non-members)" in report
    assert "the intervals below are wide" in report
    for finding in evaluation.membership_findings:
        assert finding.meaning in report
        low, high = finding.auc_ci
        if low <= 0.5 <= high:
            assert "does not separate this run's training records from its held-out records better than chance" in (
                finding.meaning
            )
    assert "record-level epsilon" in report and "x16" in report
    results = json.loads(Path(evaluation.results).read_text())  # strict JSON: no NaN or Infinity
    assert results["data"]["members"] == n
    assert {row["attack"] for row in results["rows"]} >= {"membership_loss", "canary_exposure", "accountant"}
    assert all(row["defense"] == "run" for row in results["rows"])
    assert (Path(evaluation.out) / "roc.png").stat().st_size > 0


def test_progress_is_plain_lines_when_not_a_terminal(evaluated):
    _, output = evaluated
    lines = output.splitlines()
    for stage in ("checking the held-out records", "membership inference", "privacy bounds", "canary exposure"):
        assert any(line.startswith(f"evaluate: {stage}: done") for line in lines), stage
    assert "\r" not in output and "\x1b" not in output


def test_progress_is_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    log = _Progress(True, stream)
    with log.stage("membership inference", "batches", 8) as update:
        for done in range(9):
            update(done, 8)
    assert "membership inference" in stream.getvalue() and "8/8" in stream.getvalue()
    assert "\r" in stream.getvalue()  # redrawn in place


# ---------------------------------------------------------------------------------------------------------------
# Records that cannot be recovered
# ---------------------------------------------------------------------------------------------------------------


def test_a_moved_data_file_is_refused_naming_the_path(file_run, tmp_path, capsys):
    config = RunConfig.from_file(file_run / "config.toml")
    data = Path(str(config.data.path))
    moved = tmp_path / "moved.jsonl"
    shutil.move(data, moved)
    try:
        with pytest.raises(RunDataUnavailableError, match="does not exist") as caught:
            evaluate_run(file_run, out=tmp_path / "out", progress=False)
        assert str(data) in str(caught.value) and "put the data back" in str(caught.value)
        capsys.readouterr()
        code = cli_main(["evaluate", "--run", str(file_run), "--out", str(tmp_path / "cli")])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and str(data) in err and len(err.strip().splitlines()) == 1
    finally:
        shutil.move(moved, data)


def test_an_edited_data_file_is_refused(file_run, tmp_path):
    config = RunConfig.from_file(file_run / "config.toml")
    data = Path(str(config.data.path))
    original = data.read_text()
    try:
        data.write_text(original + json.dumps({"instruction": "one more", "output": "record"}) + "\n")
        with pytest.raises(RunDataUnavailableError, match=r"client 0 has \(records, units, dropped\)"):
            evaluate_run(file_run, out=tmp_path / "added", progress=False)
        # same count, every text changed: the held-out records are not the run's any more
        data.write_text("".join(line.replace('"}', ' today."}') + "\n" for line in original.splitlines()))
        with pytest.raises(RunDataUnavailableError, match=r"recorded .* at round 0"):
            evaluate_run(file_run, out=tmp_path / "edited", progress=False)
    finally:
        data.write_text(original)


def test_a_manifest_that_is_not_the_generators_is_refused(synthetic_run, tmp_path):
    copy = _copy_run(synthetic_run, tmp_path)
    manifest = json.loads((copy / "data_manifest.json").read_text())
    manifest["canaries"][0]["secret"] = "000000"
    (copy / "data_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDataUnavailableError, match="lists other canaries"):
        evaluate_run(copy, out=tmp_path / "out", progress=False)
    (copy / "data_manifest.json").unlink()
    with pytest.raises(RunDataUnavailableError, match=r"data_manifest\.json is missing"):
        evaluate_run(copy, out=tmp_path / "out", progress=False)
    config = (copy / "config.toml").read_text()
    (copy / "config.toml").write_text(config.replace('source = "synthetic"', 'source = "warehouse"'))
    with pytest.raises(RunDataUnavailableError, match=r"data\.source") as caught:
        evaluate_run(copy, out=tmp_path / "out", progress=False)
    assert "version that made the run" in str(caught.value)


def test_an_unfinished_run_and_a_report_inside_the_run_are_refused(synthetic_run, tmp_path):
    with pytest.raises(RunEvaluationError, match="inside the run folder"):
        evaluate_run(synthetic_run, out=synthetic_run / "attacks", progress=False)
    copy = _copy_run(synthetic_run, tmp_path)
    shutil.rmtree(copy / "adapter")
    with pytest.raises(RunEvaluationError, match="has not released its adapter"):
        evaluate_run(copy, out=tmp_path / "out", progress=False)
    with pytest.raises(RunEvaluationError, match=r"no config\.toml"):
        evaluate_run(tmp_path, out=tmp_path.parent / "out", progress=False)


def test_cli_refuses_run_with_matrix_options(synthetic_run, tmp_path, capsys):
    code = cli_main(["evaluate", "--run", str(synthetic_run), "--quick", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "--run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The control: an adapter that memorised the run's training records
# ---------------------------------------------------------------------------------------------------------------


def test_control_membership_separates_an_overfit_adapters_own_training_records(file_run, tmp_path):
    copy = _copy_run(file_run, tmp_path)
    config = RunConfig.from_file(copy / "config.toml")
    model, tokenizer = load_adapter(copy)
    template = ChatTemplate(tokenizer, system_prompt=config.data.system_prompt, max_length=config.data.max_length)
    members = load_federation_data(config).clients[0]
    batch = TokenizedDataset.build(members, template)
    rows = batch.batch_of_rows(list(range(len(batch.examples))))
    torch.manual_seed(0)
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=0.05)
    model.train()
    for _ in range(30):  # memorise the run's 32 training records, no DP
        loss = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, labels=rows.labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        shutil.copy(Path(saved) / "adapter_model.safetensors", copy / "adapter" / "adapter_model.safetensors")

    evaluation = evaluate_run(copy, out=tmp_path / "out", progress=False)
    loss = evaluation.membership.reports["loss"].auc
    assert evaluation.data.members == evaluation.data.nonmembers == 32
    assert loss.value > 0.7 and loss.ci_low > 0.5, loss
    assert evaluation.membership.reports["reference"].auc.ci_low > 0.5
    finding = next(f for f in evaluation.membership_findings if f.score == "loss")
    assert "does separate this run's training records from its held-out records" in finding.meaning
    assert finding.consistent_with_guarantee is None  # no DP: nothing to be consistent with
    # the replaced adapter is attacked, and the report says it is not the one the run released
    assert any("is not the adapter this run released" in w for w in evaluation.warnings)
    assert "No differential privacy" in Path(evaluation.report).read_text()
