"""Flower deployment runtime: a real SuperLink and SuperNodes on 127.0.0.1, driven by `flwr run`.

Not simulation: every party is its own OS process tree with its own Flower home and ports, the
SuperNodes reach the SuperLink's Fleet API over plain HTTP or over TLS with certificates this file
generates, and each message a SuperNode receives runs in a fresh `flwr-clientapp` process. The job is
the tiny-LLaMA federation with SecAgg+; its numbers must equal the in-process run's, bit for bit.
A SuperNode killed in the middle of a round's secure aggregation is a dropout the protocol recovers
from (or the round aborts), never a revealed update.

Every process a test starts (and every process Flower starts below it, detached or not) is stopped
by its process group in the fixture's finalizer, within a bounded time, and checked gone.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flwr")
if os.name != "posix":  # process groups, SIGKILL
    pytest.skip("the deployment tests start process groups (POSIX only)", allow_module_level=True)
if not (Path(sys.executable).parent / "flower-superlink").exists():
    pytest.skip("flower-superlink is not installed next to this interpreter", allow_module_level=True)

from _deploy import Deployment, make_certificates, tail
from test_runner import tiny_config

from secure_fedllm import run

pytestmark = pytest.mark.integration  # minutes each: a SuperLink, SuperNodes and a fresh ClientApp per message

# Seconds. A fresh ClientApp process imports torch for each offer, train and ledger message (20-40 s
# with 3-4 nodes on a busy 2-core runner); `run_on_grid` bounds those by `train-timeout`, and each
# protocol stage (a few seconds, most of it the SuperNode's poll) by `stage-timeout`.
STAGE_TIMEOUT = 30.0
TRAIN_TIMEOUT = 240.0
RUN_TIMEOUT = 900.0
# 3-4 nodes that tolerate a killed node: only the semi-honest setting can (malicious needs 2t > n + n_C)
SECAGG = (
    'secure_aggregation.protocol="secagg+"',
    "secure_aggregation.dropout_rate=0.3",
    'secure_aggregation.setting="semi-honest"',
)


@pytest.fixture
def deployments(tmp_path):
    """Factory of `Deployment`s under tmp_path; the finalizer stops them all and checks nothing survives."""
    started: list[Deployment] = []

    def make(name: str, *, tls: bool) -> Deployment:
        certificates = make_certificates(tmp_path / name / "certs") if tls else None
        deployment = Deployment(tmp_path / name / "deploy", tls=certificates)
        deployment.work.mkdir(parents=True)
        started.append(deployment)
        return deployment

    yield make
    survivors, slow = [], []
    for deployment in started:
        t = time.monotonic()
        survivors += [_describe(p) for p in deployment.stop(grace=5.0)]
        if time.monotonic() - t > 30.0:
            slow.append(f"{deployment.work}: {time.monotonic() - t:.1f} s")
    assert not survivors, f"processes survived the teardown: {survivors}"
    assert not slow, f"stopping took too long: {slow}"


def _describe(process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())}"
    except Exception:  # gone meanwhile
        return f"{process.pid} (gone)"


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The in-process run of the 3-client SecAgg+ job, in the default (malicious) setting."""
    config = tiny_config(tiny_model_dir, 'secure_aggregation.protocol="secagg+"')
    assert config.secure_aggregation.setting == "malicious"
    return config, run(config, out=tmp_path_factory.mktemp("ref") / "run", progress=False)


def _provision(config, d: Deployment, clients: int) -> list[bytes]:
    """Each node's identity key and site policy in its own state folder (the roster pins all their keys)."""
    from secure_fedllm.federation import open_site
    from secure_fedllm.site import SitePolicy, site_policy_path, site_security_policy

    folders = [d.work / f"node-{i}" / "state" for i in range(clients)]
    roster = [open_site(config, folder, i).identity_public_key for i, folder in enumerate(folders)]
    security = site_security_policy(config, roster=roster)
    for i, folder in enumerate(folders):
        SitePolicy(security=security, identity_key="identity.key").to_file(site_policy_path(folder, i))
    return roster


def _config_files(config, work: Path, clients: int) -> tuple[Path, list[Path]]:
    """The server's copy of the configuration and one per node (as on separate machines)."""
    server = work / "server-config.toml"
    config.to_file(server)
    nodes = []
    for i in range(clients):
        path = work / f"node-{i}-config.toml"
        config.to_file(path)
        nodes.append(path)
    return server, nodes


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _logs(d: Deployment) -> str:
    parts = [tail(d.work / "flwr-run.log", 60), tail(d.work / "superlink.log", 20)]
    return "\n".join(parts + [tail(n.log, 25) for n in d.nodes])


def _wait(runner, d: Deployment, timeout: float = RUN_TIMEOUT) -> None:
    try:
        runner.wait(timeout=timeout)
    except Exception:
        pytest.fail(f"`flwr run` did not finish within {timeout} s\n{_logs(d)}")
    assert runner.returncode == 0, f"`flwr run` exited with {runner.returncode}\n{_logs(d)}"


def _check_tls(d: Deployment) -> None:
    """The SuperLink's one port speaks TLS only, with a certificate our CA signed for 127.0.0.1."""
    with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP: the server hangs up
        urllib.request.urlopen(f"http://{d.address}/health", timeout=5)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://{d.address}/health", timeout=5, context=ssl.create_default_context())
    assert d.tls is not None
    context = ssl.create_default_context(cafile=str(d.tls.ca))
    with urllib.request.urlopen(f"https://{d.address}/health", timeout=5, context=context) as response:
        assert response.status == 200


# Both variants opt in (-m slow): the three-site example (test_flower_example.py) runs a TLS deployment
# in the integration tier and the simulation engine checks equality with the in-process run, so this
# test would add minutes to CI for coverage the tier already has.
@pytest.mark.parametrize(
    "transport", [pytest.param("insecure", marks=pytest.mark.slow), pytest.param("tls", marks=pytest.mark.slow)]
)
def test_deployment_run_equals_the_in_process_run(transport, reference, deployments, tmp_path) -> None:
    """SuperLink + 3 SuperNodes, 2 rounds of SecAgg+ (malicious setting): run folder, ledgers, same perplexities."""
    config, ref = reference
    d = deployments(transport, tls=transport == "tls")
    server_config, node_configs = _config_files(config, tmp_path, 3)
    _provision(config, d, 3)
    d.start_superlink()
    if transport == "tls":
        _check_tls(d)
    for i, path in enumerate(node_configs):
        d.start_supernode(i, path)
    d.wait_for_nodes(3)
    out = tmp_path / "run"
    runner = d.flwr_run({"config": str(server_config), "out": str(out),
                         "stage-timeout": STAGE_TIMEOUT, "train-timeout": TRAIN_TIMEOUT})  # fmt: skip
    _wait(runner, d)

    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2], _logs(d)
    assert all(r["engine"] == "flower" for r in rows)
    for row in rows[1:]:
        assert row["aborted"] is None and row["included"] == [0, 1, 2] and row["dropped"] == []
        assert row["protocol"]["threshold"] >= 2 and row["bytes"]["upload"] > 0
        assert row["protocol"]["malicious"]  # keys from the nodes, checked against each node's own policy
    assert (out / "report.md").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "ledger").exists(), "ledgers belong to the nodes, not the server's run folder"
    for node in d.nodes:
        site = node.state_dir / f"client-{node.partition:04d}"
        ledger = json.loads(next((site / "ledgers").glob("*.json")).read_text())
        assert [e["round"] for e in ledger["events"]] == [1, 2]
    # the same job as in process: bit-identical perplexities and epsilons
    assert [r["perplexity"] for r in rows] == [r["perplexity"] for r in ref.metrics]
    assert {int(k): v for k, v in rows[-1]["epsilon"].items()} == ref.epsilons


def test_deployment_survives_a_supernode_killed_during_secure_aggregation(
    tiny_model_dir, deployments, tmp_path
) -> None:
    """4 SuperNodes; node 3 is SIGKILLed (whole process group) after its key shares, before its masked input."""
    config = tiny_config(tiny_model_dir, *SECAGG, "federation.clients=4")
    d = deployments("kill", tls=False)
    server_config, node_configs = _config_files(config, tmp_path, 4)
    d.start_superlink()
    for i, path in enumerate(node_configs):
        d.start_supernode(i, path)
    d.wait_for_nodes(4)
    out = tmp_path / "run"
    runner = d.flwr_run({"config": str(server_config), "out": str(out),
                         "stage-timeout": STAGE_TIMEOUT, "train-timeout": TRAIN_TIMEOUT})  # fmt: skip
    victim = d.nodes[3]
    # Round 1 is the first round with `train` messages: #1 setup (train + AdvertiseKeys), #2 ShareKeys,
    # #3 MaskedInput. Killing on #3's arrival leaves the node's pairwise masks for the others to
    # recover, the protocol's dropout path. (A kill a stage later would only include the node.)
    deadline = time.monotonic() + RUN_TIMEOUT
    while victim.log.read_text(errors="replace").count("Receiving: train message") < 3:
        assert runner.poll() is None, f"the run ended before node 3 reached its masked input\n{_logs(d)}"
        assert time.monotonic() < deadline, _logs(d)
        time.sleep(0.2)
    d.kill_node(victim)
    assert victim.process.poll() is not None
    _wait(runner, d)

    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2], _logs(d)
    for row in rows[1:]:  # never exactly one update in a sum, never a partial reveal
        assert len(row["included"]) != 1
        assert row["aborted"] is not None or len(row["included"]) >= row["protocol"]["threshold"]
    first, second = rows[1], rows[2]
    if first["aborted"] is None:  # recovered: the sum of the three others
        assert first["participants"] == [0, 1, 2, 3] and first["included"] == [0, 1, 2], first
        assert first["dropped"] == [3] and "3" in first["failures"], first
    else:  # or aborted within the stage timeout, with nothing revealed
        assert first["included"] == [], first
    # the run went on without node 3
    assert second["aborted"] is None and second["included"] == [0, 1, 2], second
    assert (out / "report.md").exists()
    # the killed node's ledger is intact and lists only the round it trained (charged before masking)
    ledger = json.loads(next((victim.state_dir / "client-0003" / "ledgers").glob("*.json")).read_text())
    assert [e["round"] for e in ledger["events"]] == [1]
    for node in d.nodes[:3]:
        site = node.state_dir / f"client-{node.partition:04d}"
        ledger = json.loads(next((site / "ledgers").glob("*.json")).read_text())
        assert [e["round"] for e in ledger["events"]] == [1, 2]
