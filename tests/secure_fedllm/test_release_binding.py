"""One update, one session, and a release key over everything the update depends on (issue 12, findings 1-2).

Finding 2: a round re-run with one record corrected passed as a free replay of the same release
(same noise, uncharged), so the two releases differed by exactly the noise-free gradient difference.
Now the release key is an HMAC over the data too: the corrected run is a new release, charged, with
a fresh noise seed from os.urandom, and the difference of the two updates is dominated by noise. The
weakened control derives the noise seed from the round and the plan (the old scheme): cosine 1.

In process, the binding is written as the masked input leaves: a run that crashes after its masked
inputs went out refuses, on resume, to send the same releases into a new session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from test_runner import tiny_config

from secure_fedllm import run, show_budget
from secure_fedllm.site import SiteState


@pytest.fixture(scope="module")
def setting(tiny_model_dir):
    """A model, its manifest and fingerprints, client 0's records and a way to build a client and a plan."""
    from secure_fedllm.adapters import AdapterManifest, adapter_fingerprints, attach_lora
    from secure_fedllm.data import ChatTemplate, load_federation_data
    from secure_fedllm.models import load_base_model, model_fingerprint
    from secure_fedllm.training import LocalTrainer

    config = tiny_config(tiny_model_dir)
    base, tokenizer = load_base_model(config.model)
    own_base = model_fingerprint(base)
    model = attach_lora(base, config.lora, a0_seed=1)
    manifest = AdapterManifest.of(model, "ffa")
    own = {"base_sha256": own_base, "manifest_sha256": manifest.digest(), **adapter_fingerprints(model)}
    template = ChatTemplate(tokenizer, system_prompt="", max_length=config.data.max_length)
    records = load_federation_data(config).clients[0][:16]
    return model, manifest, own, template, records, LocalTrainer(model)


def _client(setting, tmp_path, records):
    from secure_fedllm.data import TokenizedDataset
    from secure_fedllm.federation import ClientPolicy, FederatedClient
    from secure_fedllm.privacy import PrivacyLedger

    _model, _manifest, own, template, _, _ = setting
    data = TokenizedDataset.build(records, template)
    # q = 1 and one SGD step: the update is linear in the noise, which is what makes the attack exact
    policy = ClientPolicy(client=0, private=True, num_units=data.num_units, noise_multiplier=1.0, max_grad_norm=1.0,
                          sample_rate=1.0, steps=1, max_participations=10, epsilon_budget=1e9, delta=1e-3)  # fmt: skip
    ledger = PrivacyLedger.open(tmp_path / "site" / "ledger.json", client=0, epsilon_budget=1e9, delta=1e-3,
                                accountant="rdp")  # fmt: skip
    client = FederatedClient(0, data, policy=policy, ledger=ledger, site=SiteState.open(tmp_path / "site"),
                             learning_rate=0.5, optimizer="sgd", fingerprints=own, job="job")  # fmt: skip
    return client


def _plan(client, own):
    from secure_fedllm.federation import RoundPlan

    participants = tuple(client.assignment(1.0).model_copy(update={"client": i}) for i in range(3))
    return RoundPlan(round=1, aggregation="ffa", protocol="secagg+", clip_range=0.1, participants=participants, **own)


def _corrected(records):
    first = records[0]
    return [dataclasses.replace(first, output=first.output + " (corrected)"), *records[1:]]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.astype(np.float64) @ b.astype(np.float64) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rerun_with_corrected_record(setting, tmp_path):
    """Round 1 released on the original records, then re-run on the corrected ones; and the noise-free target."""
    from secure_fedllm.adapters import get_vector

    model, manifest, own, _, records, trainer = setting
    start = get_vector(model, manifest)
    first_client = _client(setting, tmp_path, records)
    plan = _plan(first_client, own)
    first = first_client.train(trainer, model, manifest, start, plan)
    second_client = _client(setting, tmp_path, _corrected(records))
    second = second_client.train(trainer, model, manifest, start, plan)
    # what the attacker wants: the noise-free difference of the two updates (same seed, no noise)
    quiet = plan.participants[0].model_copy(update={"noise_multiplier": 0.0})
    seed = b"\x07" * 32
    target = first_client._train(trainer, model, manifest, start, quiet, seed) - second_client._train(
        trainer, model, manifest, start, quiet, seed
    )
    return first, second, target, second_client


def test_a_rerun_with_a_corrected_record_is_a_new_charged_release_with_fresh_noise(setting, tmp_path) -> None:
    first, second, target, _ = _rerun_with_corrected_record(setting, tmp_path)
    assert np.linalg.norm(target) > 0  # the corrected record does change the gradient
    assert second.release_key != first.release_key and not second.replayed
    assert second.rounding_seed != first.rounding_seed
    events = json.loads((tmp_path / "site" / "ledger.json").read_text())["events"]
    assert [e["round"] for e in events] == [1, 1]  # charged twice: two releases of round 1
    assert second.epsilon > first.epsilon
    cosine = _cosine(first.delta - second.delta, target)
    assert abs(cosine) < 0.3, cosine  # the difference is noise, not the gradient difference
    # and the fresh seeds live only in the site's folder, mode 0600
    seeds = [json.loads(p.read_text())["seed"] for p in (tmp_path / "site" / "releases").glob("*.json")]
    assert len(set(seeds)) == 2
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "site").rglob("*") if p.is_file())


def test_control_seeds_from_the_round_and_plan_give_the_noise_free_difference(setting, tmp_path, monkeypatch) -> None:
    """Weakened control: the noise seed derived from the round (and plan), as the old release id did."""

    def old_scheme(self, job: str, round_number: int, release_key: bytes) -> bytes:
        return b"\x07" * 32 if round_number == 1 else hashlib.sha256(b"round|%d" % round_number).digest()

    monkeypatch.setattr(SiteState, "noise_seed", old_scheme)
    first, second, target, _ = _rerun_with_corrected_record(setting, tmp_path)
    cosine = _cosine(first.delta - second.delta, target)
    assert cosine > 0.9999, cosine  # the noise cancels: the server learns the gradient difference exactly
    assert np.allclose(first.delta - second.delta, target, atol=1e-6)


def test_the_same_release_is_answered_from_the_stored_output_without_retraining(setting, tmp_path) -> None:
    from secure_fedllm.adapters import get_vector

    model, manifest, own, _, records, trainer = setting
    client = _client(setting, tmp_path, records)
    start = get_vector(model, manifest)
    plan = _plan(client, own)
    first = client.train(trainer, model, manifest, start, plan)

    class Exploding:
        def train(self, *args, **kwargs):
            raise AssertionError("a re-request of a charged release must not retrain")

    again = _client(setting, tmp_path, records).train(Exploding(), model, manifest, start, plan)  # type: ignore[arg-type]
    assert again.replayed and np.array_equal(again.delta, first.delta) and again.epsilon == first.epsilon
    assert len(json.loads((tmp_path / "site" / "ledger.json").read_text())["events"]) == 1


def test_in_process_resume_after_the_masked_inputs_left_refuses_a_second_session(tiny_model_dir, tmp_path) -> None:
    """A crash after round 2's masked inputs went out: on resume the clients refuse to send them again."""
    from protocols import decode_message
    from protocols.secagg import MaskedInput

    config = tiny_config(tiny_model_dir, "evaluation.generations=0")
    out = tmp_path / "run"
    sent: list[int] = []

    def crash(round_number: int, client: int, wire: bytes) -> None:
        if round_number == 2 and isinstance(decode_message(wire), MaskedInput):
            sent.append(client)
            if len(sent) == 3:  # every masked input of round 2 left, then the process dies
                raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run(config, out=out, progress=False, tap=crash)
    sites = tmp_path / "run.sites"
    assert all(len(list((sites / f"client-{c:04d}" / "bindings").glob("*.json"))) == 2 for c in range(3))
    resumed = run(resume=out, progress=False)
    row = resumed.metrics[2]
    assert set(row.refused) == {0, 1, 2} and "one session only" in row.refused[0]
    assert row.aborted == "only 0 clients can join" and row.included == []
    # budget show reads the ledgers from the sites folder (default <run>.sites, or --sites)
    shown = show_budget(out)
    assert [r["client"] for r in shown] == [0, 1, 2] and all(r["rounds_joined"] == [1, 2] for r in shown)
    assert show_budget(out, sites=sites) == shown
    # no secret of any client is in the run folder
    secrets = [(sites / f"client-{c:04d}" / "secret.key").read_bytes() for c in range(3)]
    secrets += [bytes.fromhex(json.loads(p.read_text())["seed"]) for p in sites.glob("client-*/releases/*.json")]
    secrets += [bytes.fromhex(p.read_text().strip()) for p in sites.glob("client-*/identity.key")]
    published = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert secrets and not any(s in published or s.hex().encode() in published for s in secrets)
