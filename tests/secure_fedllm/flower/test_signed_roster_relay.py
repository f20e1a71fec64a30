"""The server relays the roster file a roster authority published; it cannot make one up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from protocols import SignedRoster
from protocols.primitives import ed25519_public
from secure_fedllm.errors import ConfigError
from secure_fedllm.flower.app import load_signed_roster


def _roster(authority: bytes, n: int = 3) -> SignedRoster:
    return SignedRoster.sign(authority, "consortium-2026", [ed25519_public(os.urandom(32)) for _ in range(n)])


def test_the_published_roster_file_loads_unchanged(tmp_path: Path) -> None:
    authority = os.urandom(32)
    signed = _roster(authority)
    path = tmp_path / "roster.json"
    path.write_text(signed.model_dump_json())
    loaded = load_signed_roster(path)
    assert loaded == signed
    assert loaded.verify(ed25519_public(authority), "consortium-2026") == signed.keys


@pytest.mark.parametrize("content", ["", "{}", '{"label": "x", "keys": [], "signature": ""}', "not json"])
def test_a_file_that_is_not_a_signed_roster_is_named(tmp_path: Path, content: str) -> None:
    path = tmp_path / "roster.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"signed-roster .*roster\.json"):
        load_signed_roster(path)


def test_a_missing_roster_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"signed-roster .*missing\.json"):
        load_signed_roster(tmp_path / "missing.json")


def test_a_roster_the_server_re_signs_does_not_verify_for_the_sites(tmp_path: Path) -> None:
    """What the relay cannot do: a server that adds its own key must re-sign, and sites check the authority."""
    authority, server = os.urandom(32), os.urandom(32)
    honest = _roster(authority)
    forged = SignedRoster.sign(server, honest.label, (*honest.keys, ed25519_public(os.urandom(32))))
    path = tmp_path / "roster.json"
    path.write_text(forged.model_dump_json())
    relayed = load_signed_roster(path)  # the server can load anything...
    from protocols import InsecureParameterError

    with pytest.raises(InsecureParameterError, match="roster_authority"):
        relayed.verify(ed25519_public(authority), honest.label)  # ...but no site accepts it
    assert relayed.verify(ed25519_public(server), honest.label)  # control: under the server's key it verifies
