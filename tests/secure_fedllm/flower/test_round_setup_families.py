"""Issue 13: `RoundSetup` carries the protocol family and its params; a node rebuilds the family from them.

Malformed or mismatched setups are refused with errors naming the field. The plaintext control rides
the same path, and a node sends in the clear only when its own site policy chose protocol="plaintext"
(control: such a node does, and the server then reads every individual input).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from protocols import (
    HEFamily,
    InsecureParameterError,
    PlaintextFamily,
    ProtocolError,
    SecAggFamily,
    SecAggParams,
    SecurityPolicy,
)
from protocols.he import HEParams
from secure_fedllm.flower import LocalGrid, secure_aggregate, secure_aggregation_mod
from secure_fedllm.flower.records import FlowerIntegrationError, RoundSetup
from secure_fedllm.site import SitePolicy

N, D = 4, 50


def _record(params, family: str | None = None, raw: bytes | None = None) -> dict[str, object]:
    """A setup record as a server sends it; `family` and `raw` (the params JSON) replace the honest ones."""
    record = RoundSetup(params, 1, os.urandom(16), 3, b"plan").to_record()
    if family is not None:
        record["family"] = family
    if raw is not None:
        record["params"] = raw
    return record


def test_each_family_round_trips_and_rebuilds_its_session_family() -> None:
    secagg = SecAggParams.secagg(N, dimension=D, clip_range=0.1)
    plus = SecAggParams.secagg_plus(40, dimension=D, clip_range=0.1)
    bfv = HEParams.bfv_packed(N, dimension=D, clip_range=0.1)
    ckks = HEParams.ckks_nvflare(N, dimension=D, clip_range=0.1)
    for params, name, kind in [(secagg, "secagg", SecAggFamily), (plus, "secagg+", SecAggFamily),
                               (bfv, "he-bfv", HEFamily), (ckks, "he-ckks", HEFamily)]:  # fmt: skip
        setup = RoundSetup.from_record(_record(params))
        assert setup.family == name and setup.params == params
        family = setup.session_family()
        assert isinstance(family, kind) and family.name == name and family.params == params
    plain = RoundSetup.from_record(_record(secagg, "plaintext"))
    with pytest.raises(InsecureParameterError, match="protocol"):
        plain.session_family()  # no policy: never in the clear
    assert isinstance(plain.session_family(policy=SecurityPolicy(protocol="plaintext")), PlaintextFamily)
    legacy = _record(secagg)
    del legacy["family"]  # a server from before issue 13 (SecAgg only)
    assert RoundSetup.from_record(legacy).family == "secagg"


def test_bad_setups_are_refused_naming_the_field() -> None:
    bfv = HEParams.bfv_packed(N, dimension=D, clip_range=0.1)
    with pytest.raises(FlowerIntegrationError, match=r"family='he-tfhe'"):
        RoundSetup.from_record(_record(bfv, "he-tfhe"))
    with pytest.raises(FlowerIntegrationError, match=r"family='he-ckks' does not match its params.*'he-bfv'"):
        RoundSetup.from_record(_record(bfv, "he-ckks"))
    with pytest.raises(FlowerIntegrationError, match=r"params\.threshold: Field required.*family 'secagg'"):
        RoundSetup.from_record(_record(bfv, "secagg"))  # HE params under a masking name: not SecAggParams
    with pytest.raises(FlowerIntegrationError, match=r"family='secagg\+' does not match its params.*'secagg'"):
        RoundSetup(SecAggParams.secagg(N, dimension=D, clip_range=0.1), 0, os.urandom(16), 3, b"", None, "secagg+")
    bad = json.loads(bfv.model_dump_json())
    bad["dimension"] = 0
    with pytest.raises(FlowerIntegrationError, match=r"params\.dimension"):
        RoundSetup.from_record(_record(bfv, raw=json.dumps(bad).encode()))
    weak = json.loads(bfv.model_dump_json())
    weak["coeff_mod_bit_sizes"] = [60, 60, 60]
    with pytest.raises(InsecureParameterError, match=r"params: coeff_mod_bit_sizes"):
        RoundSetup.from_record(_record(bfv, raw=json.dumps(weak).encode()))
    seeded = HEParams.bfv_seeded(N, dimension=D, clip_range=0.1)
    assert RoundSetup.from_record(_record(seeded)).params == seeded  # control: symmetric BFV may be seeded
    public = json.loads(seeded.model_dump_json())
    public["mode"] = "public-key"  # a seeded public-key ciphertext has no uniform half a seed could replace
    with pytest.raises(InsecureParameterError, match=r"params: seeded=True needs scheme='bfv' and mode='symmetric'"):
        RoundSetup.from_record(_record(bfv, raw=json.dumps(public).encode()))
    noisy = json.loads(HEParams.ckks_nvflare(N, dimension=D, clip_range=0.1).model_dump_json())
    noisy["scale_bits"] = 25  # CKKS rounding would no longer be exact
    with pytest.raises(InsecureParameterError, match=r"scale_bits=25"):
        RoundSetup.from_record(_record(bfv, "he-ckks", raw=json.dumps(noisy).encode()))


def _inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    return [rng.uniform(-0.1, 0.1, D) for _ in range(N)]


def _app() -> ClientApp:
    app = ClientApp(mods=[secure_aggregation_mod])
    inputs = _inputs()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        content = {"arrays": ArrayRecord([inputs[i]]), "metrics": MetricRecord({"num-examples": 1.0})}
        return Message(RecordDict(content), reply_to=msg)

    return app


class _Grid(LocalGrid):
    errors: list[str]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(super().push_messages(messages))
        self.errors.extend(r.error.reason for mid in ids if (r := self._replies.get(mid)) is not None and r.has_error())
        return ids


@pytest.mark.parametrize("chosen", ["secagg+", "plaintext"])
def test_a_node_sends_in_the_clear_only_if_its_own_policy_chose_plaintext(tmp_path, chosen) -> None:
    configs = []
    for i in range(N):
        SitePolicy(security=SecurityPolicy(protocol=chosen)).to_file(tmp_path / f"s{i}.toml")
        configs.append({"partition-id": i, "site-policy": str(tmp_path / f"s{i}.toml")})
    grid = _Grid(_app(), configs)
    grid.errors = []
    params = SecAggParams.secagg_plus(N, dimension=D, clip_range=0.1)
    family = PlaintextFamily(params, policy=SecurityPolicy(protocol="plaintext"))  # the server's choice
    run = {"round_number": 1, "train_timeout": 0.05, "stage_timeout": 0.05, "poll_interval": 0.001}
    if chosen != "plaintext":
        with pytest.raises(ProtocolError, match="no inputs arrived"):  # every node refuses: no input ever arrives
            secure_aggregate(grid, {n: RecordDict() for n in grid.get_node_ids()}, family, **run)  # type: ignore[arg-type]
        assert len(grid.errors) == N and all("protocol" in why and "secagg+" in why for why in grid.errors)
        return
    # the control: sites that chose plaintext send their inputs, and the server sums them in the clear
    result = secure_aggregate(grid, {n: RecordDict() for n in grid.get_node_ids()}, family, **run)  # type: ignore[arg-type]
    assert result.aggregate.insecure and result.aggregate.included == tuple(range(N))
    exact = np.clip(np.sum(_inputs(), axis=0), -N * 0.1, N * 0.1)
    assert np.abs(result.aggregate.decoded.weighted_sum - exact).max() <= result.aggregate.decoded.max_abs_error
