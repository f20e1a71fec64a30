"""The deployment example (examples/flower_app): three sites, their own data, keys, policies and state.

The fast tests check what `make_sites.py` provisions: each site's files, disjoint people, and a
roster only the authority (not the server) can sign. The integration test runs the example as an
operator would: a SuperLink with TLS on 127.0.0.1, one SuperNode per site with that site's node
config, `flwr run examples/flower_app` with the server's config and the relayed signed roster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from protocols import InsecureParameterError, SignedRoster
from protocols.primitives import ed25519_public
from protocols.randomness import DeterministicRandom
from secure_fedllm.config import RunConfig
from secure_fedllm.site import SitePolicy

EXAMPLE = Path(__file__).parents[3] / "examples" / "flower_app"


def _example():
    spec = importlib.util.spec_from_file_location("flower_app_make_sites", EXAMPLE / "make_sites.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_sites():
    return _example()


def _config(*extra: str) -> RunConfig:
    return RunConfig().with_overrides(["federation.clients=3", "secure_aggregation.dropout_rate=0.0", *extra])


def test_each_site_gets_its_own_data_key_policy_and_state(make_sites, tmp_path) -> None:
    layout = make_sites.provision(tmp_path / "ex", _config(), randomness=DeterministicRandom(b"example"))
    people = []
    for site, expected in zip(layout.sites, (48, 64, 80), strict=True):
        rows = [json.loads(line) for line in site.data.read_text().splitlines()]
        assert len(rows) == expected and {"instruction", "input", "output", "person_id"} <= set(rows[0])
        people.append({r["person_id"] for r in rows})
        assert stat.S_IMODE(os.stat(site.identity_key).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(site.state).st_mode) == 0o700
        policy = SitePolicy.from_file(site.policy)
        assert policy.identity_key_path == site.identity_key and policy.state_path == site.state
        assert site.identity_pub.read_text() == ed25519_public(policy.load_identity_key()).hex()
        config = make_sites.node_config(site)
        assert config["partition-id"] == site.index and Path(config["data-path"]) == site.data
        assert RunConfig.from_file(site.config) == RunConfig.from_file(layout.server_config)
    assert not (people[0] & people[1]) and not (people[0] & people[2]) and not (people[1] & people[2])
    # the authority's key is not on the server's side of the layout
    assert layout.authority_key.parent != layout.server_config.parent
    with pytest.raises(FileExistsError):  # never overwrite keys, data or ledgers
        make_sites.provision(layout.root, _config())


def test_sites_accept_only_the_authoritys_roster_and_the_server_cannot_add_a_sybil(make_sites, tmp_path) -> None:
    layout = make_sites.provision(tmp_path / "ex", _config())
    relayed = SignedRoster.model_validate_json(layout.roster.read_text())
    site_keys = [bytes.fromhex(s.identity_pub.read_text()) for s in layout.sites]
    server_key = DeterministicRandom(b"server").token_bytes(32)  # the aggregator's own signing key
    sybil = ed25519_public(DeterministicRandom(b"sybil").token_bytes(32))
    forged = make_sites.sign_roster(server_key, layout.label, [*site_keys, sybil])
    for site in layout.sites:
        policy = SitePolicy.from_file(site.policy).security
        assert policy.with_roster(relayed).roster == tuple(site_keys)
        with pytest.raises(InsecureParameterError, match="roster"):
            policy.with_roster(forged)  # signed by the server, with a Sybil
        with pytest.raises(InsecureParameterError, match="roster"):
            policy.with_roster(None)  # or no roster at all
        # control: a site that trusted the server as its authority takes the Sybil in
        weakened = policy.model_copy(update={"roster_authority": ed25519_public(server_key)})
        assert sybil in weakened.with_roster(forged).roster


# -- the example on a real SuperLink over TLS ---------------------------------------------------------

STAGE_TIMEOUT = 30.0
TRAIN_TIMEOUT = 240.0
RUN_TIMEOUT = 900.0


@pytest.mark.integration
def test_three_site_example_runs_over_tls(make_sites, tiny_model_dir, tmp_path) -> None:
    """Each site's node reads its own file and keeps its ledger; the nodes take the authority's roster."""
    pytest.importorskip("flwr")
    if not (Path(sys.executable).parent / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed next to this interpreter")
    from _deploy import Deployment, make_certificates, tail
    from test_runner import tiny_config

    config = tiny_config(tiny_model_dir, 'secure_aggregation.protocol="secagg+"')
    layout = make_sites.provision(tmp_path / "example", config)
    d = Deployment(tmp_path / "deploy", tls=make_certificates(tmp_path / "certs"))
    d.work.mkdir(parents=True)
    out = tmp_path / "run"

    def logs() -> str:
        return "\n".join([tail(d.work / "flwr-run.log", 60), tail(d.work / "superlink.log", 20)]
                         + [tail(n.log, 25) for n in d.nodes])  # fmt: skip

    try:
        d.start_superlink()
        for site in layout.sites:
            d.start_supernode(site.index, node_config=make_sites.node_config(site))
        d.wait_for_nodes(3)
        runner = d.flwr_run(
            {"config": str(layout.server_config), "out": str(out), "signed-roster": str(layout.roster),
             "stage-timeout": STAGE_TIMEOUT, "train-timeout": TRAIN_TIMEOUT},
            app=EXAMPLE,
        )  # fmt: skip
        t = time.monotonic()
        runner.wait(timeout=RUN_TIMEOUT)
        assert runner.returncode == 0, (
            f"`flwr run` exited with {runner.returncode} after {time.monotonic() - t:.0f} s\n{logs()}"
        )
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert [r["round"] for r in rows] == [0, 1, 2], logs()
        for row in rows[1:]:
            assert row["aborted"] is None and row["included"] == [0, 1, 2], (row, logs())
            assert row["protocol"]["malicious"]
    finally:
        survivors = d.stop(grace=5.0)
    assert not survivors, f"processes survived the teardown: {[p.pid for p in survivors]}"
    assert not list(out.rglob("ledger*")), "ledgers belong to the sites, not the server's run folder"
    for site, lines in zip(layout.sites, (48, 64, 80), strict=True):
        # each node counted its own file (sizes differ per site), not a partition of a shared source
        facts = json.loads((site.state / f"client-{site.index:04d}" / "facts.json").read_text())
        assert facts["records"] + facts["dropped"] == lines, (site.index, facts)
        ledgers = [p for p in site.state.rglob("*.json") if "ledger" in p.name or "ledger" in p.parent.name]
        assert ledgers, f"site {site.index} kept no ledger in its state folder"
        assert not any(str(site.state) in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
