"""SitePolicy files, and the in-process default run in the malicious setting (issue 12)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from protocols import InsecureParameterError, SecurityPolicy, decode_message
from protocols.primitives import ed25519_public
from protocols.secagg import SurvivorSignature
from secure_fedllm.config import RunConfig
from secure_fedllm.errors import ConfigError
from secure_fedllm.federation import aggregate_updates, site_folder
from secure_fedllm.federation.aggregation import secagg_params, simulated_identity_keys
from secure_fedllm.site import SitePolicy, site_policy_path, site_security_policy


def _roster(n: int) -> tuple[bytes, ...]:
    return tuple(ed25519_public(os.urandom(32)) for _ in range(n))


@pytest.mark.parametrize("suffix", ["toml", "json"])
def test_site_policy_round_trips_and_resolves_paths_next_to_the_file(tmp_path: Path, suffix: str) -> None:
    key = os.urandom(32)
    (tmp_path / "identity.key").write_text(key.hex())
    policy = SitePolicy(
        security=SecurityPolicy(protocol="secagg", roster=_roster(5), corrupt_fraction=0.2, sigma=48),
        identity_key="identity.key",
        state_dir="state",
    )
    policy.to_file(tmp_path / f"policy.{suffix}")
    loaded = SitePolicy.from_file(tmp_path / f"policy.{suffix}")
    assert loaded == policy
    assert loaded.load_identity_key() == key
    assert loaded.state_path == tmp_path / "state"


def test_site_policy_errors_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('kind = "secure-fedllm.site-policy"\n[security]\nprotocl = "secagg"\n')
    with pytest.raises(ConfigError, match=r"security\.protocl: unknown key"):
        SitePolicy.from_file(tmp_path / "bad.toml")
    (tmp_path / "low.toml").write_text("[security]\nsigma = 20\n")
    with pytest.raises(ConfigError, match=r"security\.sigma"):
        SitePolicy.from_file(tmp_path / "low.toml")
    with pytest.raises(ConfigError, match="identity_key is unset"):
        SitePolicy.from_dict({"security": {"roster": [k.hex() for k in _roster(3)]}})
    (tmp_path / "short.key").write_text("abcd")
    with pytest.raises(ConfigError, match="64 hex digits"):
        SitePolicy(identity_key=str(tmp_path / "short.key")).load_identity_key()
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        SitePolicy().to_file(tmp_path / "policy.yaml")


def test_the_policy_path_matches_the_runners_site_folder(tmp_path: Path) -> None:
    assert site_policy_path(tmp_path, 7) == site_folder(tmp_path, 7) / "policy.toml"


def test_setting_is_malicious_by_default_and_validated() -> None:
    assert RunConfig().secure_aggregation.setting == "malicious"
    with pytest.raises(ConfigError, match=r"secure_aggregation\.setting"):
        RunConfig().with_overrides(['secure_aggregation.setting="honest-ish"'])


def _types(seen: list[tuple[int, bytes]]) -> set[str]:
    return {type(decode_message(wire)).__name__ for _, wire in seen}


def test_the_default_in_process_round_runs_the_malicious_setting() -> None:
    config = RunConfig().with_overrides(["federation.clients=5"])
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-0.04, 0.04, 300).astype(np.float32) for _ in range(5)]
    seen: list[tuple[int, bytes]] = []
    outcome = aggregate_updates(config, updates, [1.0] * 5, round_number=1, context=b"c", drop_at={},
                                tap=lambda p, w: seen.append((p, w)))  # fmt: skip
    assert outcome.malicious and outcome.mean is not None
    assert SurvivorSignature.__name__ in _types(seen)  # the consistency round ran
    semi = config.with_overrides(['secure_aggregation.setting="semi-honest"'])
    seen.clear()
    plain = aggregate_updates(semi, updates, [1.0] * 5, round_number=1, context=b"c", drop_at={},
                              tap=lambda p, w: seen.append((p, w)))  # fmt: skip
    assert not plain.malicious and SurvivorSignature.__name__ not in _types(seen)
    assert np.allclose(outcome.mean, plain.mean, atol=2 * outcome.max_abs_error + 1e-12)


def test_n_c_is_counted_over_the_roster_of_all_clients() -> None:
    config = RunConfig().with_overrides(["federation.clients=100", "federation.clients_per_round=8"])
    keys = simulated_identity_keys(8)
    publics = [ed25519_public(k) for k in keys]
    alone = secagg_params(config, 8, 10, identity_keys=publics)  # roster = the 8 members: n_C = 1
    roster = [*publics, *_roster(92)]
    pinned = secagg_params(config, 8, 10, identity_keys=publics, roster=roster)  # n_C = ceil(0.05 x 100) = 5
    assert (alone.max_corrupt, pinned.max_corrupt) == (1, 5)
    assert pinned.threshold - 5 >= 2 and pinned.threshold > alone.threshold
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-0.04, 0.04, 10).astype(np.float32) for _ in range(8)]
    out = aggregate_updates(config, updates, [1.0] * 8, round_number=1, context=b"c", drop_at={},
                            identity_keys=keys, roster=roster)  # fmt: skip
    assert out.threshold == pinned.threshold and out.malicious
    policy = site_security_policy(config, roster=roster)
    with pytest.raises(InsecureParameterError, match=r"^(threshold|neighbours)"):
        policy.check_secagg(alone, party_id=0, identity_public_key=publics[0])


def test_a_configured_threshold_below_the_sites_floor_is_refused() -> None:
    config = RunConfig().with_overrides(["federation.clients=10", "secure_aggregation.threshold=3"])
    publics = [ed25519_public(k) for k in simulated_identity_keys(10)]
    with pytest.raises(InsecureParameterError):
        secagg_params(config, 10, 10, identity_keys=publics)


def test_a_cohort_that_cannot_run_the_malicious_setting_fails_before_round_0() -> None:
    from secure_fedllm.site import check_setting

    three = RunConfig().with_overrides(["federation.clients=3"])  # n_C = 1 needs t = 3: no room for a dropout
    with pytest.raises(ConfigError, match=r"setting='malicious' with 3 clients.*secure_aggregation\.dropout_rate"):
        check_setting(three)
    check_setting(three.with_overrides(["secure_aggregation.dropout_rate=0.0"]))
    check_setting(three.with_overrides(['secure_aggregation.setting="semi-honest"']))
    check_setting(RunConfig())  # the default job (4 clients) runs it
    # n_C counts all clients: 8 per round out of 100 (n_C = 5) is refused where 8 of 8 (n_C = 1) is not
    check_setting(RunConfig().with_overrides(["federation.clients=8", "secure_aggregation.dropout_rate=0.0"]))
    with pytest.raises(ConfigError, match="n_C=5"):
        check_setting(
            RunConfig().with_overrides(
                ["federation.clients=100", "federation.clients_per_round=8", "secure_aggregation.dropout_rate=0.3"]
            )
        )
