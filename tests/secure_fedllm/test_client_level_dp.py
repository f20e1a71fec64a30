"""Issue 14: client-level distributed DP (Kairouz, Liu, Steinke 2021): rotate, clip, round, noise; un-rotate.

The randomized Hadamard rotation is checked against scipy's Hadamard matrix (an independent
oracle), and the server's step against the clients' own stored integer releases.
"""

from __future__ import annotations

import glob
import json

import numpy as np
import pytest
from scipy.linalg import hadamard
from test_runner import tiny_config

from secure_fedllm import ConfigError, RunConfig, run
from secure_fedllm.federation.federation import job_id
from secure_fedllm.federation.plan import client_policy
from secure_fedllm.privacy.distributed import ring_scale
from secure_fedllm.privacy.rotation import padded_dimension, rotate, rotation_seed, unrotate


def test_rotation_is_the_signed_normalised_hadamard_transform_and_its_inverse():
    seed = rotation_seed("job", 3)
    x = np.random.default_rng(1).normal(size=13)  # padded to 16
    y = rotate(x, seed)
    signs = rotate(np.eye(16)[0], seed)[0] * 4  # H[0, :] is all ones: the first column reveals sign 0
    assert abs(signs) == pytest.approx(1.0)
    # the oracle: H / 4 @ diag(s) @ pad(x), with s read off the rotation of the unit vectors
    s = np.array([rotate(np.eye(16)[i], seed)[0] * 4 for i in range(16)])
    expected = hadamard(16) / 4.0 @ (s * np.concatenate([x, np.zeros(3)]))
    np.testing.assert_allclose(y, expected, atol=1e-12)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))  # an isometry: the sensitivity is unchanged
    np.testing.assert_allclose(unrotate(y, seed, 13), x, atol=1e-12)
    # the seed is public and per round: another round rotates differently, so no fixed basis is reused
    assert not np.allclose(rotate(x, rotation_seed("job", 4)), y)
    # a spiky update is spread over every coordinate (the ring needs no headroom for one large value)
    spike = np.zeros(1000)
    spike[7] = 1.0
    assert np.abs(rotate(spike, seed)).max() == pytest.approx(1 / np.sqrt(1024))


def test_client_level_needs_distributed_mode_and_sizes_its_policy_per_client():
    with pytest.raises(ConfigError, match="unit"):
        RunConfig().with_overrides(['privacy.unit="client"'])
    config = RunConfig().with_overrides(
        ['privacy.mode="distributed"', 'privacy.unit="client"', 'secure_aggregation.protocol="secagg"']
    )
    policy = client_policy(config, 0, 256, dimension=368_640)
    assert policy.distributed is not None
    assert policy.sample_rate == 1.0 and policy.delta == pytest.approx(0.1 / 4)  # the unit is a client
    assert policy.distributed.dimension == padded_dimension(368_640) == 524_288
    assert policy.local_steps == 3 and policy.local_sample_rate == pytest.approx(32 / 256)


@pytest.fixture(scope="module")
def client_level(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("client-level")
    config = tiny_config(
        tiny_model_dir,
        'privacy.mode="distributed"',
        'privacy.unit="client"',
        'secure_aggregation.protocol="secagg"',
        "federation.clients=4",
        "federation.rounds=1",
        "federation.local_steps=2",
        "secure_aggregation.dropout_rate=0.1",
        "evaluation.generations=0",
    )
    return config, run(config, out=root / "run", progress=False), root


def test_the_server_applies_the_unrotated_mean_of_the_released_vectors(client_level):
    config, result, root = client_level
    files = sorted(glob.glob(str(root / "run.sites" / "*" / "releases" / "*.i64")))
    outputs = [np.fromfile(f, dtype="<i8") for f in files]
    d = sum(
        int(np.prod(shape))
        for _n, shape in json.loads((result.adapter / "secure_fedllm_adapter.json").read_text())["manifest"]
    )
    assert len(outputs) == 4 and all(o.shape == (padded_dimension(d),) for o in outputs)
    total = np.sum(outputs, axis=0).astype(np.float64)
    scale = ring_scale(config.privacy.max_grad_norm, padded_dimension(d))
    expected = unrotate(total / scale, rotation_seed(job_id(config), 1), d) / 4  # FFA starts from B = 0
    final = np.fromfile(next((result.out / "checkpoint").glob("global-*.f32")), dtype="<f4")
    np.testing.assert_allclose(final, expected.astype(np.float32), rtol=1e-5, atol=1e-7)
    # each client's clipped, rounded update is at most l2 in norm; with the noise shares the sum is far larger
    policy = client_policy(config, 0, 64, dimension=d)
    assert policy.distributed is not None
    assert np.linalg.norm(total) > policy.distributed.l2  # noise dominates at 4 clients, as expected


def test_client_level_ledger_charges_one_unsampled_skellam_step_per_round(client_level):
    _config, result, root = client_level
    for ledger_file in sorted(glob.glob(str(root / "run.sites" / "*" / "ledgers" / "*.json"))):
        (event,) = json.loads(open(ledger_file).read())["events"]
        assert event["mechanism"] == "skellam" and event["sample_rate"] == 1.0
        assert event["own_mu"] == pytest.approx(event["mu"] / 2)
    assert all(7.9 <= eps <= 8.0 for eps in result.epsilons.values())
