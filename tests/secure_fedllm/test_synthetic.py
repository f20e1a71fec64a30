from __future__ import annotations

import pytest

from secure_fedllm.data import CANARY_FORMATS, synthesize_federation


def test_same_seed_same_data_other_seed_other_data():
    a = synthesize_federation(4, 256, seed=7)
    assert a == synthesize_federation(4, 256, seed=7)
    assert a.clients != synthesize_federation(4, 256, seed=8).clients


def test_sizes_and_people_never_span_clients():
    fed = synthesize_federation(4, 256, seed=1)
    assert [len(c) for c in fed.clients] == [256] * 4
    owners = [{r.person_id for r in client} for client in fed.clients]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not owners[i] & owners[j]


def test_each_canary_appears_exactly_repeats_times_in_its_client_only():
    fed = synthesize_federation(3, 128, seed=2)
    assert len(fed.canaries) == len(CANARY_FORMATS) * 3
    assert sorted({c.repeats for c in fed.canaries}) == [1, 4, 16]
    for canary in fed.canaries:
        text = canary.prefix + canary.secret
        counts = [sum(r.output == text for r in client) for client in fed.clients]
        assert counts[canary.client] == canary.repeats
        assert sum(counts) == canary.repeats
        assert len(canary.secret) == CANARY_FORMATS[canary.format_name][1] and canary.secret.isdigit()
        assert any(r.person_id == canary.person_id for r in fed.clients[canary.client])
    assert {m["canary_id"] for m in fed.manifest()} == {c.canary_id for c in fed.canaries}


def test_records_are_alpaca_shaped_and_about_their_person():
    fed = synthesize_federation(2, 64, seed=3, canary_repeats=(1,))
    record = next(r for r in fed.clients[0] if "address" in r.instruction)
    name = record.instruction.removeprefix("What is the home address of ").removesuffix("?")
    assert record.output.startswith(f"{name} lives at ")
    assert record.input == ""


def test_client_too_small_for_its_canaries_is_refused():
    with pytest.raises(ValueError, match="records_per_client"):
        synthesize_federation(1, 30, seed=0)
