"""Run folders never lose data: checks before writes, refusals that name the fix, idempotent resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_runner import tiny_config

from secure_fedllm import ConfigError, run
from secure_fedllm.federation import Checkpoint, RunFolderError, RunInterruptedError, RunPaths
from secure_fedllm.federation.folder import open_run_folder


def _one_round(model_dir, *extra: str):
    return tiny_config(model_dir, "federation.rounds=1", "evaluation.generations=0", *extra)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.copytree(src.with_name(src.name + ".sites"), dst.with_name(dst.name + ".sites"))
    return dst


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    config = _one_round(tiny_model_dir)
    return config, run(config, out=tmp_path_factory.mktemp("folders") / "run", progress=False)


def test_out_refuses_a_non_empty_folder_that_is_not_a_run(tiny_model_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "report.md").write_text("mine")
    with pytest.raises(RunFolderError, match=r"photos: is not empty and holds no run.*new or empty folder"):
        run(_one_round(tiny_model_dir), out=out, progress=False)
    assert _snapshot(out) == {"report.md": b"mine"}


def test_out_refuses_a_run_of_another_config_and_names_the_fix(finished, tmp_path):
    config, result = finished
    before = _snapshot(result.out)
    with pytest.raises(RunFolderError, match=rf"{result.out}: holds a run of another configuration.*--resume"):
        run(config.with_overrides(["federation.rounds=2"]), out=result.out, progress=False)
    assert _snapshot(result.out) == before


def test_resume_of_a_finished_run_is_a_no_op_that_says_so(finished, capsys):
    config, result = finished
    before = _snapshot(result.out)
    again = run(resume=result.out, progress=True)
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot(result.out) == before  # adapter/ (lora_B included) and report.md untouched
    assert [r.perplexity for r in again.metrics] == [r.perplexity for r in result.metrics]
    assert again.epsilons == result.epsilons
    same = run(config, out=result.out, progress=False)  # --out of the same finished run: the same no-op
    assert _snapshot(result.out) == before and same.epsilons == result.epsilons


def test_a_run_interrupted_after_its_last_checkpoint_finishes_from_the_saved_vector(finished, tmp_path):
    _, result = finished
    out = _copy_run(result.out, tmp_path / "cut")
    shutil.rmtree(out / "adapter")
    (out / "report.md").unlink()
    resumed = run(resume=out, progress=False)
    ours = load_file(str(resumed.adapter / "adapter_model.safetensors"))
    theirs = load_file(str(result.adapter / "adapter_model.safetensors"))
    assert any(ours[k].abs().sum() > 0 for k in ours if "lora_B" in k)  # not the fresh B = 0 adapter
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert (out / "report.md").exists() and [r.round for r in resumed.metrics] == [0, 1]


@pytest.mark.parametrize("damage", ["state", "vector", "metrics"])
def test_a_corrupted_checkpoint_or_metrics_file_is_named(finished, tmp_path, damage):
    config, result = finished
    out = _copy_run(result.out, tmp_path / "bad")
    paths = RunPaths(out)
    if damage == "state":
        (paths.checkpoint / "state.json").write_text("{not json")
        where = "state.json"
    elif damage == "vector":
        vector = next(paths.checkpoint.glob("global-*.f32"))
        vector.write_bytes(vector.read_bytes()[:-6])
        where = vector.name
    else:
        paths.metrics.write_text(paths.metrics.read_text().replace('"perplexity"', '"perplexity":"x","p"', 1))
        where = "metrics.jsonl:1"
    with pytest.raises(RunFolderError, match=where):
        run(resume=out, progress=False)
    with pytest.raises(RunFolderError, match=where):
        run(config, out=out, progress=False)


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_rerun(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    broken = _one_round(tiny_model_dir).with_overrides([f'model.name="{tmp_path / "no-such-model"}"'])
    with pytest.raises(Exception):  # noqa: B017  (whatever the model loader raises)
        run(broken, out=out, progress=False)
    assert not out.exists()  # every check ran before anything was written
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception):  # noqa: B017
        run(broken, out=empty, progress=False)
    assert list(empty.iterdir()) == []
    # the corrected config is accepted for both folders
    assert open_run_folder(_one_round(tiny_model_dir), out, None).new
    assert open_run_folder(_one_round(tiny_model_dir), empty, None).new


def test_a_failure_in_round_0_removes_the_config_it_wrote(tiny_model_dir, tmp_path, monkeypatch):
    from secure_fedllm.federation.federation import Job

    def broken(self, vector, record):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(Job, "evaluate", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(_one_round(tiny_model_dir), out=out, progress=False)
    assert not out.exists()


def test_ctrl_c_says_how_to_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"

    def interrupt(round_number, client, wire):
        raise KeyboardInterrupt

    with pytest.raises(RunInterruptedError, match=rf"after round 0's checkpoint.*--resume {out}"):
        run(_one_round(tiny_model_dir), out=out, progress=False, tap=interrupt)
    saved = Checkpoint.load(RunPaths(out))
    assert saved is not None and saved.round == 0
    assert open_run_folder(None, None, out).start == 1


def test_resume_refuses_a_folder_without_a_run(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.toml"):
        run(resume=tmp_path, progress=False)


def test_flower_refuses_another_runs_folder_before_flower_starts(finished, tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from secure_fedllm.flower import simulation

    config, result = finished
    started = []
    monkeypatch.setattr(simulation, "simulation_superlink", lambda *a, **k: started.append(1))
    before = _snapshot(result.out)
    with pytest.raises(RunFolderError, match="another configuration"):
        simulation.run_simulation(config.with_overrides(["federation.rounds=3"]), out=result.out)
    assert not started and _snapshot(result.out) == before
    # the same finished run: nothing to do, and Flower is not started either
    again = simulation.run_simulation(config, out=result.out)
    assert not started and again.epsilons == result.epsilons and _snapshot(result.out) == before


def test_flower_verifies_that_what_it_reads_back_is_this_run(finished, tmp_path):
    pytest.importorskip("flwr")
    import time

    from secure_fedllm.flower.simulation import FlowerEngineError, _load_result

    config, result = finished
    with pytest.raises(FlowerEngineError, match="predates this run"):
        _load_result(result.out, config, time.time() + 60)
    out = _copy_run(result.out, tmp_path / "half")
    (out / "report.md").unlink()
    with pytest.raises(FlowerEngineError, match="stopped"):
        _load_result(out, config, 0.0)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["round"] == 1
