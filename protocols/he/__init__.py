"""Secure aggregation by additive homomorphic encryption (TenSEAL), sans-IO.

The server sums ciphertexts and never holds a secret key; dropouts need no recovery round. Packed
BFV is the default: updates are quantized by the masking protocols' fixed-point encoding and
several 16-bit values share each slot, so sums are exact integers at about 7.6 bytes per
parameter. CKKS with NVFlare's parameters is there for comparison.

Threat model (read before choosing HE over masking):

* One client, the key holder (chosen by a public rule), generates the secret key each session and
  (in symmetric mode, NVFlare's choice) sends it to every other client over pairwise X25519 +
  AES-GCM channels. Every client then holds the key: the server must not collude with any client,
  or every individual update it holds decrypts. In public-key mode only the key holder has it, and
  the server must not collude with that one client.
* Without identity keys a malicious server could substitute its own X25519 key and intercept the
  secret context: only a semi-honest server is covered then. With identity keys, hellos are signed.
* Only the key holder releases a decrypted (BFV) sum to the server, once, signed, and only its own
  homomorphic sum of the individually signed uploads: a server that forges "the sum" (k * E(x_i),
  or a subset chosen per client) gets nothing. Other clients check signatures and the encrypted
  counter before they decrypt for themselves.
* A malicious client's out-of-range values are invisible under encryption; the bound checks after
  decryption (fields, counter) catch accidental overflow and malformed sums, not a deliberately
  skewed but in-range input.
* CKKS decryptions leak key material to whoever also holds the ciphertexts (Li and Micciancio,
  EUROCRYPT 2021), so a CKKS aggregate is decrypted by clients only and never released to the
  server (this package would need noise flooding to do that; it does not). BFV decryption is exact:
  the released integer sum is what the server is meant to learn anyway.
* TenSEAL has no threshold decryption, key rotation or ciphertext authentication: uploads are
  therefore signed, their length is bounded before parsing, and a key is used for one session.
"""

from ._ciphers import self_test
from ._client import HEClient
from ._messages import (
    HEAck,
    HEHello,
    HEInput,
    HEKeyOffer,
    HEKeys,
    HEMessage,
    HERoster,
    HESum,
    decode_he_message,
    encode_he_message,
)
from ._params import HE_STANDARD_128, HEParams
from ._server import HEServer, HEServerState

__all__ = [
    "HE_STANDARD_128",
    "HEAck",
    "HEClient",
    "HEHello",
    "HEInput",
    "HEKeyOffer",
    "HEKeys",
    "HEMessage",
    "HEParams",
    "HERoster",
    "HEServer",
    "HEServerState",
    "HESum",
    "decode_he_message",
    "encode_he_message",
    "self_test",
]
