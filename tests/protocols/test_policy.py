"""SecurityPolicy: the parameters a site accepts, fixed by the site (n_C over the roster, floors, refusals)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from protocols import FixedPointEncoding, InsecureParameterError, SecAggParams, SecurityPolicy, derive_secagg_plus
from protocols.primitives import ed25519_public
from protocols.secagg import SIGMA


def _keys(n: int) -> tuple[list[bytes], tuple[bytes, ...]]:
    secrets = [os.urandom(32) for _ in range(n)]
    return secrets, tuple(ed25519_public(k) for k in secrets)


_, ROSTER = _keys(100)


def test_corrupt_count_is_over_the_whole_roster_not_the_announced_n() -> None:
    policy = SecurityPolicy(roster=ROSTER, corrupt_fraction=0.05)
    assert policy.max_corrupt(10) == policy.max_corrupt(100) == 5  # ceil(0.05 x 100), whatever n
    assert SecurityPolicy(corrupt_fraction=0.05).max_corrupt(10) == 1  # no roster: a fraction of n
    params = policy.derive(10, dimension=4, clip_range=0.1, identity_keys=ROSTER[:10])
    assert params.max_corrupt == 5 and params.threshold - params.max_corrupt >= policy.min_honest_survivors
    for party in range(10):
        policy.check_secagg(params, party_id=party, identity_public_key=ROSTER[party])
    # what a server would announce with n_C as a fraction of its own small session (n_C = 1)
    small = SecAggParams.secagg_plus(10, dimension=4, clip_range=0.1, identity_keys=ROSTER[:10])
    assert small.max_corrupt == 1 and small.threshold < params.threshold
    with pytest.raises(InsecureParameterError, match=r"^(threshold|neighbours|corrupt_parties)"):
        policy.check_secagg(small, party_id=0, identity_public_key=ROSTER[0])


def test_derive_matches_explicit_counts_and_is_what_an_honest_server_announces() -> None:
    policy = SecurityPolicy(roster=ROSTER, corrupt_fraction=0.05, dropout_rate=0.1)
    params = policy.derive(100, dimension=3, clip_range=0.1, identity_keys=ROSTER)
    k, t = derive_secagg_plus(100, dropout_rate=0.1, corrupt_fraction=0.05, malicious=True)
    assert (params.neighbours, params.threshold) == (k, t)  # roster of 100 = n: same counts as the fractions
    restored = SecAggParams.model_validate_json(params.model_dump_json())
    assert restored == params and restored.digest() == params.digest()
    # parameters without explicit counts keep their JSON (and digest) of before
    plain = SecAggParams.secagg_plus(12, dimension=3, clip_range=0.1)
    assert "corrupt_parties" not in plain.model_dump_json()


def test_min_honest_survivors_bounds_t_minus_n_c() -> None:
    strict = SecurityPolicy(roster=ROSTER[:20], corrupt_fraction=0.2, min_honest_survivors=12)
    with pytest.raises(InsecureParameterError, match=r"^threshold=.*min_honest_survivors=12"):
        strict.derive(20, dimension=3, clip_range=0.1, identity_keys=ROSTER[:20])
    loose = SecurityPolicy(roster=ROSTER[:20], corrupt_fraction=0.2)
    params = loose.derive(20, dimension=3, clip_range=0.1, identity_keys=ROSTER[:20])
    assert params.threshold - 4 >= 2
    with pytest.raises(InsecureParameterError, match=r"^threshold=.*min_honest_survivors=12"):
        strict.check_secagg(params, party_id=0, identity_public_key=ROSTER[0])


def _announced(**changes: object) -> SecAggParams:
    policy = SecurityPolicy(roster=ROSTER[:10])
    base = policy.derive(10, dimension=3, clip_range=0.1, identity_keys=ROSTER[:10])
    data = base.model_dump()
    data.update(changes)
    return SecAggParams.model_construct(**data)  # as the server sends it: the site must not trust its checks


CASES = [
    ("protocol", SecurityPolicy(protocol="he", corrupt_fraction=0.0), {}),
    ("neighbours", SecurityPolicy(protocol="secagg", roster=ROSTER[:10]), {}),  # SecAgg+ to a SecAgg site
    ("num_parties", SecurityPolicy(roster=ROSTER[:30], min_parties=20), {}),
    ("allow_insecure", SecurityPolicy(roster=ROSTER[:10]), {"allow_insecure": True}),
    ("identity_keys", SecurityPolicy(roster=ROSTER[:10]), {"identity_keys": None}),  # downgrade
    ("identity_keys", SecurityPolicy(roster=ROSTER[:10]), {"identity_keys": ROSTER[10:20]}),  # Sybils
    ("identity_keys", SecurityPolicy(roster=ROSTER[:10]), {"identity_keys": ROSTER[1:10] + ROSTER[:1]}),
    ("identity_keys", SecurityPolicy(roster=ROSTER[:10]), {"identity_keys": ROSTER[:9] + ROSTER[:1]}),
    ("threshold", SecurityPolicy(roster=ROSTER[:10]), {"threshold": 3}),
    ("neighbours", SecurityPolicy(roster=ROSTER[:10]), {"neighbours": 2, "threshold": 3}),
    ("corrupt_parties", SecurityPolicy(roster=ROSTER[:10]), {"corrupt_parties": 0, "corrupt_fraction": 0.0}),
]


@pytest.mark.parametrize(("field", "policy", "changes"), CASES)
def test_every_refusal_names_its_field(field: str, policy: SecurityPolicy, changes: dict[str, object]) -> None:
    params = _announced(**changes)
    with pytest.raises(InsecureParameterError) as caught:
        policy.check_secagg(params, party_id=0, identity_public_key=ROSTER[0])
    assert str(caught.value).startswith(field), str(caught.value)


def test_the_unchanged_announcement_passes_so_the_cases_above_can_fail() -> None:
    SecurityPolicy(roster=ROSTER[:10]).check_secagg(_announced(), party_id=0, identity_public_key=ROSTER[0])


def test_a_site_with_an_identity_key_refuses_the_semi_honest_setting_even_without_a_roster() -> None:
    semi = SecAggParams.secagg(10, dimension=3, clip_range=0.1)
    SecurityPolicy().check_secagg(semi, party_id=0, identity_public_key=None)  # a semi-honest site accepts
    with pytest.raises(InsecureParameterError, match=r"^identity_keys: the server announced no identity keys"):
        SecurityPolicy().check_secagg(semi, party_id=0, identity_public_key=ROSTER[0])


def test_weak_assumptions_at_n_100_are_refused_by_a_site_assuming_5_percent() -> None:
    weak = SecAggParams.secagg_plus(100, dimension=3, clip_range=0.1, dropout_rate=0.0, corrupt_fraction=0.0)
    assert (weak.neighbours, weak.threshold) == (2, 3)
    SecurityPolicy(corrupt_fraction=0.0, dropout_rate=0.0).check_secagg(weak, party_id=0, identity_public_key=None)
    with pytest.raises(InsecureParameterError, match=r"^neighbours: neighbours=2, threshold=3 at num_parties=100"):
        SecurityPolicy(corrupt_fraction=0.05).check_secagg(weak, party_id=0, identity_public_key=None)


def test_a_larger_announced_dropout_counts_against_security() -> None:
    policy = SecurityPolicy(roster=ROSTER[:30], dropout_rate=0.1)
    params = policy.derive(30, dimension=3, clip_range=0.1, identity_keys=ROSTER[:30])
    policy.check_secagg(params, party_id=0, identity_public_key=ROSTER[0])
    lowered_floor = _with(params, dropped_parties=params.neighbours - params.max_corrupt)  # k <= n_C + d_max
    with pytest.raises(InsecureParameterError, match=r"^(neighbours|threshold)"):
        policy.check_secagg(lowered_floor, party_id=0, identity_public_key=ROSTER[0])


def _with(params: SecAggParams, **changes: object) -> SecAggParams:
    data = params.model_dump()
    data.update(changes)
    return SecAggParams.model_construct(**data)


def test_sigma_is_the_sites_own() -> None:
    params = SecurityPolicy().derive(200, dimension=3, clip_range=0.1)  # fails with probability ~2^-79
    SecurityPolicy().check_secagg(params, party_id=0, identity_public_key=None)
    SecurityPolicy(sigma=SIGMA + 38).check_secagg(params, party_id=0, identity_public_key=None)
    with pytest.raises(InsecureParameterError, match=f"2\\^-{SIGMA + 40} under this site.s n_C=10"):
        SecurityPolicy(sigma=SIGMA + 40).check_secagg(params, party_id=0, identity_public_key=None)
    with pytest.raises(ValidationError):
        SecurityPolicy(sigma=SIGMA - 1)


def test_he_is_refused_while_any_client_may_collude() -> None:
    with pytest.raises(InsecureParameterError, match=r"^corrupt_fraction=0.05: HE with a single key holder"):
        SecurityPolicy(protocol="he").check_he(num_parties=10)
    with pytest.raises(InsecureParameterError, match=r"^corrupt_fraction"):
        SecurityPolicy(protocol="he", roster=ROSTER, corrupt_fraction=0.001).check_he(num_parties=5)
    SecurityPolicy(protocol="he", corrupt_fraction=0.0).check_he(num_parties=10)
    with pytest.raises(InsecureParameterError, match=r"^protocol"):
        SecurityPolicy().check_he(num_parties=10)
    with pytest.raises(InsecureParameterError, match=r"^protocol"):
        SecurityPolicy(protocol="he", corrupt_fraction=0.0).derive(10, dimension=3, clip_range=0.1)
    with pytest.raises(InsecureParameterError, match=r"^protocol"):
        SecurityPolicy().check_plaintext()
    SecurityPolicy(protocol="plaintext").check_plaintext()


def test_policy_validation_and_json_round_trip() -> None:
    policy = SecurityPolicy(roster=ROSTER[:5], corrupt_fraction=0.1, dropout_rate=0.2, sigma=48, min_parties=4)
    assert SecurityPolicy.model_validate_json(policy.model_dump_json()) == policy
    with pytest.raises(ValidationError, match="repeats a key"):
        SecurityPolicy(roster=ROSTER[:4] + ROSTER[:1])
    with pytest.raises(ValidationError, match="below min_parties"):
        SecurityPolicy(roster=ROSTER[:3], min_parties=4)
    with pytest.raises(ValidationError):
        SecurityPolicy(corrupt_fraction=0.5)
    with pytest.raises(ValidationError):
        SecurityPolicy(protocol="secagg", unknown=1)  # type: ignore[call-arg]
    encoding = FixedPointEncoding(clip_range=0.1, max_parties=5, ring_bits=64)
    params = SecurityPolicy(roster=ROSTER[:5], corrupt_fraction=0.0, dropout_rate=0.0).derive(
        5, dimension=3, encoding=encoding, identity_keys=ROSTER[:5]
    )
    assert params.encoding.ring_bits == 64
    with pytest.raises(InsecureParameterError, match=r"^identity_keys: this site pins a roster"):
        SecurityPolicy(roster=ROSTER[:5]).derive(5, dimension=3, clip_range=0.1)


def test_a_roster_signed_by_the_sites_authority_replaces_a_pinned_one() -> None:
    from protocols import SignedRoster

    authority, server_key = os.urandom(32), os.urandom(32)
    _, keys = _keys(10)
    policy = SecurityPolicy(roster_authority=ed25519_public(authority), roster_label="job-7")
    signed = SignedRoster.sign(authority, "job-7", keys)
    assert SignedRoster.model_validate_json(signed.model_dump_json()) == signed
    params = policy.derive(10, dimension=3, clip_range=0.1, identity_keys=keys, signed_roster=signed)
    assert params == SecurityPolicy(roster=keys).derive(10, dimension=3, clip_range=0.1, identity_keys=keys)
    policy.check_secagg(params, party_id=3, identity_public_key=keys[3], signed_roster=signed)
    # n_C over the signed roster: a roster of 100 keys asks more of a 10-party session
    big = SignedRoster.sign(authority, "job-7", keys + ROSTER[:90])
    with pytest.raises(InsecureParameterError, match=r"^(threshold|neighbours)"):
        policy.check_secagg(params, party_id=3, identity_public_key=keys[3], signed_roster=big)
    # the server relays nothing, its own roster (Sybils), or one signed for another label
    sybils = SignedRoster.sign(server_key, "job-7", keys[:1] + ROSTER[:9])
    refused = [None, sybils, SignedRoster.sign(authority, "job-6", keys)]
    forged = signed.model_copy(update={"keys": keys[:9] + ROSTER[:1]})  # same signature, another key set
    for relayed in [*refused, forged]:
        with pytest.raises(InsecureParameterError, match=r"^roster"):
            policy.check_secagg(params, party_id=3, identity_public_key=keys[3], signed_roster=relayed)
    # an authority-trusting site runs the malicious setting: no downgrade either
    semi = SecAggParams.secagg(10, dimension=3, clip_range=0.1)
    with pytest.raises(InsecureParameterError, match=r"^identity_keys: the server announced no identity keys"):
        policy.check_secagg(semi, party_id=3, identity_public_key=keys[3], signed_roster=signed)
    with pytest.raises(ValidationError, match="not both"):
        SecurityPolicy(roster=keys, roster_authority=ed25519_public(authority), roster_label="job-7")
    with pytest.raises(ValidationError, match="go together"):
        SecurityPolicy(roster_authority=ed25519_public(authority))
    with pytest.raises(InsecureParameterError, match=r"^roster: the signed roster is unusable"):
        policy.with_roster(SignedRoster.sign(authority, "job-7", keys[:2]))
    with pytest.raises(InsecureParameterError, match=r"^corrupt_fraction"):
        SecurityPolicy(protocol="he", roster_authority=ed25519_public(authority), roster_label="x").check_he(
            num_parties=10
        )
