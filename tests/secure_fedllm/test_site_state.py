"""A site's private state folder: modes, secrets created once, release keys, noise seeds and bindings (issue 12)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from secure_fedllm.errors import ReleaseBindingError
from secure_fedllm.site import SiteState, SiteStateError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_folder_is_private_and_its_secrets_are_created_once(tmp_path) -> None:
    site = SiteState.open(tmp_path / "site")
    key = site.identity_key
    assert _mode(tmp_path / "site") == 0o700
    for name in ("secret.key", "identity.key", "site.json"):
        assert _mode(tmp_path / "site" / name) == 0o600, name
    again = SiteState.open(tmp_path / "site")
    assert again.identity_key == key and again._secret == site._secret
    expected = Ed25519PrivateKey.from_private_bytes(key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert site.identity_public_key == expected
    assert (tmp_path / "site" / "identity.pub").read_text() == expected.hex()
    other = SiteState.open(tmp_path / "other")
    assert other._secret != site._secret and other.identity_key != key  # from the CSPRNG, per site


def test_release_keys_cover_every_input_and_depend_on_the_site_secret(tmp_path) -> None:
    site, other = SiteState.open(tmp_path / "a"), SiteState.open(tmp_path / "b")
    parts = {"plan": b"p" * 32, "global_adapter": np.zeros(5, np.float32), "data": b"d" * 32,
             "hyperparameters": {"learning_rate": 0.1}, "template": "t", "round": 1}  # fmt: skip
    key = site.release_key(**parts)
    assert key == site.release_key(**parts) and len(key) == 32
    assert other.release_key(**parts) != key  # an HMAC under the site's secret: nobody else can compute it
    for name, changed in (("plan", b"q" * 32), ("global_adapter", np.full(5, 1e-7, np.float32)),
                          ("data", b"e" * 32), ("hyperparameters", {"learning_rate": 0.2}), ("template", "u"),
                          ("round", 2)):  # fmt: skip
        assert site.release_key(**{**parts, name: changed}) != key, name


def test_noise_seeds_are_fresh_per_release_and_kept(tmp_path) -> None:
    site = SiteState.open(tmp_path / "site")
    one, two = site.release_key(data=b"1"), site.release_key(data=b"2")
    seed = site.noise_seed("job", 1, one)
    assert site.noise_seed("job", 1, one) == seed  # the same release: the same seed (a replay)
    assert SiteState.open(tmp_path / "site").noise_seed("job", 1, one) == seed
    assert site.noise_seed("job", 1, two) != seed  # a new release of the same round: fresh noise
    fresh = SiteState.open(tmp_path / "fresh")
    assert fresh.noise_seed("job", 1, fresh.release_key(data=b"1")) != seed  # never derived from round or plan


def test_reproducible_mode_is_fixed_when_the_folder_is_created(tmp_path) -> None:
    a = SiteState.open(tmp_path / "a", reproducible_seed=b"11|0")
    b = SiteState.open(tmp_path / "b", reproducible_seed=b"11|0")
    assert a.noise_seed("j", 1, a.release_key(x=1)) == b.noise_seed("j", 1, b.release_key(x=1))
    with pytest.raises(SiteStateError, match="reproducible mode"):
        SiteState.open(tmp_path / "a")
    SiteState.open(tmp_path / "secure")
    with pytest.raises(SiteStateError, match="secure mode"):
        SiteState.open(tmp_path / "secure", reproducible_seed=b"x")


def test_outputs_are_stored_per_release_and_older_rounds_dropped(tmp_path) -> None:
    site = SiteState.open(tmp_path / "site")
    k1, k2 = site.release_key(r=1), site.release_key(r=2)
    site.noise_seed("j", 1, k1)
    site.save_output("j", 1, k1, np.arange(4, dtype=np.float32))
    assert np.array_equal(site.load_output("j", 1, k1), np.arange(4, dtype=np.float32))
    assert site.load_output("j", 1, k2) is None
    site.noise_seed("j", 2, k2)
    site.save_output("j", 2, k2, np.ones(4, dtype=np.float32))
    assert site.load_output("j", 1, k1) is None and site.load_output("j", 2, k2) is not None


def test_one_release_one_session(tmp_path) -> None:
    site = SiteState.open(tmp_path / "site")
    key = site.release_key(x=1)
    s1, s2, transcript = b"\x01" * 16, b"\x02" * 16, b"t" * 32
    site.check_binding("j", 1, key, session=s2)  # unbound: any session may still have it
    site.bind("j", 1, key, s1, transcript)
    site.bind("j", 1, key, s1, transcript)  # the same session again: a resent message
    assert _mode(next((tmp_path / "site" / "bindings").glob("*.json"))) == 0o600
    with pytest.raises(ReleaseBindingError, match="one update goes to one session only"):
        site.bind("j", 1, key, s2, transcript)
    with pytest.raises(ReleaseBindingError, match="one update goes to one session only"):
        site.check_binding("j", 1, key, session=s2)
    with pytest.raises(ReleaseBindingError, match="another transcript"):
        site.check_binding("j", 1, key, session=s1, transcript=b"u" * 32)
    site.check_binding("j", 1, key, session=s1, survivors=(3, 1, 2))
    site.check_binding("j", 1, key, session=s1, survivors=(1, 2, 3))  # the same set: the same answer
    with pytest.raises(ReleaseBindingError, match="already answered for survivors"):
        SiteState.open(tmp_path / "site").check_binding("j", 1, key, session=s1, survivors=(1, 2))
    other = site.release_key(x=2)
    site.bind("j", 1, other, s2, transcript)  # another release (new data, charged) may go to another session


def test_tampered_state_is_refused_with_a_typed_error(tmp_path) -> None:
    site = SiteState.open(tmp_path / "site")
    key = site.release_key(x=1)
    site.noise_seed("j", 1, key)
    site.bind("j", 1, key, b"\x01" * 16, b"t" * 32)
    release = next((tmp_path / "site" / "releases").glob("*.json"))
    release.write_text(json.dumps({"seed": "zz"}))
    with pytest.raises(SiteStateError, match="noise seed"):
        site.noise_seed("j", 1, key)
    binding = next((tmp_path / "site" / "bindings").glob("*.json"))
    binding.write_text("{not json")
    with pytest.raises(SiteStateError, match="unreadable"):
        site.binding("j", 1, key)
    (tmp_path / "site" / "secret.key").write_bytes(b"short")
    with pytest.raises(SiteStateError, match="32 bytes"):
        SiteState.open(tmp_path / "site")
