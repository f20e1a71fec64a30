"""The polynomial wire layout of keys and ciphertexts (finding 4(c)): exact sizes, every coefficient below
its modulus, round trips through contexts built locally, and sizes no larger than TenSEAL's own format."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import DecodeError
from protocols.he import HEParams, export_chunk
from protocols.he._ciphers import export_key, load_chunk, load_key, make_context
from protocols.he._wire import layout

CONFIGS = [
    (HEParams.bfv_packed, "symmetric"),
    (HEParams.bfv_packed, "public-key"),
    (HEParams.ckks_nvflare, "symmetric"),
    (HEParams.ckks_nvflare, "public-key"),
]


@pytest.mark.parametrize(("make", "mode"), CONFIGS)
def test_keys_and_ciphertexts_round_trip_through_locally_built_contexts(make, mode):
    import tenseal as ts

    params = make(4, dimension=100, clip_range=0.05, mode=mode)
    shape = layout(params)
    holder = make_context(params)
    key = export_key(params, holder)
    assert len(key) == shape.key_bytes
    peer = load_key(params, key)
    assert peer.is_private() == (mode == "symmetric")
    values = list(range(1, 40))
    fresh = ts.bfv_vector(peer, values) if params.scheme == "bfv" else ts.ckks_vector(peer, [float(v) for v in values])
    chunk = export_chunk(shape, fresh)
    assert len(chunk) == shape.chunk_bytes == params.max_chunk_bytes
    back = load_chunk(params, holder, chunk, 0, field="chunks")  # the holder decrypts what the peer encrypted
    assert np.allclose(np.asarray(back.decrypt())[:39], values, atol=1e-3)
    assert len(chunk) <= len(fresh.serialize())  # never larger than TenSEAL's zstd-compressed format


@pytest.mark.parametrize(("make", "mode"), CONFIGS[:3:2])
def test_a_coefficient_at_its_modulus_is_refused_for_every_modulus(make, mode):
    params = make(4, dimension=100, clip_range=0.05, mode=mode)
    shape = layout(params)
    flat = np.zeros(2 * shape.degree * len(shape.data_moduli), dtype=np.uint64)
    for j, q in enumerate(shape.data_moduli):
        for value, ok in ((q - 1, True), (q, False)):
            bad = flat.copy().reshape(2, len(shape.data_moduli), shape.degree)
            bad[1, j, 17] = value
            data = shape.pack(bad.reshape(-1), 2, shape.data_moduli)
            if ok:
                shape.unpack(data, 2, shape.data_moduli, field="chunks[0]", peer_id=2)
            else:
                with pytest.raises(DecodeError, match=f"polynomial 1 is not below its modulus \\(prime {j}\\)") as info:
                    shape.unpack(data, 2, shape.data_moduli, field="chunks[0]", peer_id=2)
                assert (info.value.field, info.value.peer_id) == ("chunks[0]", 2)


def test_the_packed_bfv_upload_is_smaller_than_before():
    params = HEParams.bfv_packed(10, dimension=1_000_000, clip_range=0.05)
    assert params.chunks * params.max_chunk_bytes / params.dimension < 7.06  # TenSEAL's format: 7.63 B/param
