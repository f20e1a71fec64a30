"""Secure aggregation by additive homomorphic encryption (TenSEAL), sans-IO.

The server sums ciphertexts and never holds a secret key; dropouts need no recovery round. Packed
BFV is the default: updates are quantized by the masking protocols' fixed-point encoding and
several 16-bit values share each slot, so sums are exact integers at about 7.0 bytes per
parameter. CKKS with NVFlare's parameters (N = 8192, [60, 40, 40], scale 2^40) encrypts the same
quantized integers, one per slot, and its release is rounded to the same exact integer sum (about
52 bytes per parameter); both schemes give the server bit-identical results. In symmetric mode (the
mode for sites whose policy has n_C = 0), `HEParams.bfv_seeded` uploads each fresh ciphertext as c0
and the 64-byte seed of its uniform half c1 = a (SEAL's seeded serialization): about 3.5 bytes per
parameter, below a 4-byte masked update. Every seed must be new (SEAL draws it from the OS CSPRNG per
encryption; a repeat leaks m - m' to whoever holds both ciphertexts), so the client refuses to send, and
the server and key holder refuse to accept, a repeated seed. Only fresh uploads are seeded: a sum is
a full ciphertext (the key holder's own, never sent), and public-key ciphertexts cannot be seeded.

Threat model (read before choosing HE over masking):

* **Single key holder: HE protects an update only when no client colludes with the server.** One
  client, the key holder (chosen by a public rule), generates a fresh secret key each session; in
  symmetric mode (NVFlare's choice) it sends it to every other client over pairwise X25519 +
  AES-GCM channels, so every client holds it and any one colluding client decrypts every upload the
  server holds. In public-key mode only the key holder has it, and the server must not collude with
  that one client. TenSEAL has no threshold decryption, so a site that assumes any corrupt client
  (n_C > 0) must not use HE (the site policy refuses it); masking (SecAgg+) covers that case. A
  malicious key holder counts as a colluding client: nothing checks that its key is well formed (a
  zero secret key, or a degenerate public key, would make every upload readable by the server).
* **The holder rule can be steered by the server (finding 4(b), a stated residual).** The holder is
  the roster member with the smallest SHA-256(transcript || id); the server picks the session id and
  the roster, so by trying about n session ids it makes a colluding client the holder. That changes
  nothing in symmetric mode (every client holds the key anyway) and is covered by the rule above in
  public-key mode: with n_C = 0 there is no colluder to promote. A commit-reveal of client
  randomness in the hellos would only turn the offline grind into about n aborted sessions (a
  withheld reveal must abort, or the server could pick the subset of reveals), which helps only with
  a per-release cap on aborted sessions; it is not done here.
* **No decryption oracle (finding 4(a)).** BFV is not IND-CCA1: replies to chosen ciphertexts leak
  the plaintext and, with enough queries, the key. A client decrypts only the homomorphic sum it
  computes itself from the individually signed uploads of this transcript (including its own,
  at least `min_contributions`); never a ciphertext the server chose. Any failed check after the key
  is loaded ends the session (state ABORTED, key dropped); a client decrypts at most once, then drops
  the key; a key is made for one session only. With either scheme only the key holder decrypts, and
  it releases the signed integer sum to the server; the other clients drop the key right after
  encrypting.
* **No peer bytes reach TenSEAL's parsers (finding 4(c)).** A changed header byte in a serialized
  TenSEAL context aborts the process (SIGABRT, uncatchable). Contexts are therefore built locally from
  the validated `HEParams`; keys and ciphertexts travel as bare polynomials whose length and every
  coefficient (below its modulus) are checked in numpy before this package writes the SEAL objects
  itself (`_wire.py`). Malformed, empty or short inputs raise `DecodeError` naming the field.
* Without identity keys a malicious server could substitute its own X25519 key and intercept the
  secret key: only a semi-honest server is covered then. With identity keys, hellos are signed.
* A malicious client's out-of-range values are invisible under encryption; the bound checks after
  decryption (fields, counter) catch accidental overflow and malformed sums, not a deliberately
  skewed but in-range input.
* A raw CKKS decryption leaks key material to whoever also holds the ciphertexts (Li and
  Micciancio, EUROCRYPT 2021): it is the plaintext plus an error that is a linear function of the
  secret key. It is therefore never released. CKKS here encrypts the fixed-point QUANTIZED integers
  (weight folded in, offset to [0, 2L], as BFV does), so the true sum is an integer vector; the key
  holder rounds its decryption to it only after checking that every value lies within
  `ckks_tolerance` = 2^-8 of an integer, and aborts otherwise (a crafted upload with large noise or a
  value between two integers is refused, never rounded: rounding a value near k + 1/2 would release
  the sign of the error, a bit of the key). The parameters are refused unless the worst-case error of
  a sum of n_max fresh ciphertexts (`HEParams.ckks_error_bound`, 2^-16.5 for NVFlare's set at n_max =
  16) is at most that tolerance and the largest scaled sum fits the modulus, so an honest sum always
  rounds to the exact integers. The released value is then a function of the inputs alone, the same
  one BFV releases, and it is what the server is meant to learn anyway; a simulator given the sum
  produces it, so it adds nothing to the key's IND-CPA security. The abort itself is one bit about
  a crafted upload's decryption; only an adversarial client can craft one, and HE is only claimed
  when no client colludes with the server (above). BFV decryption is exact by construction.
* TenSEAL has no threshold decryption, key rotation or ciphertext authentication: uploads are
  therefore signed, their exact length is checked before parsing, and a key is used for one session.
"""

# ciphertext-level hazmat (like protocols.primitives): for benchmarks and threat models that craft or
# decrypt ciphertexts themselves; never needed to run a round
from ._ciphers import decode_words, decrypt_ckks_values, decrypt_words, load_chunk, round_ckks, self_test
from ._client import HEClient, HEClientState, key_holder
from ._export import export_chunk
from ._family import HEFamily
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
from ._wire import layout

__all__ = [
    "HE_STANDARD_128",
    "HEAck",
    "HEClient",
    "HEClientState",
    "HEFamily",
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
    "decode_words",
    "decrypt_ckks_values",
    "decrypt_words",
    "encode_he_message",
    "export_chunk",
    "key_holder",
    "layout",
    "load_chunk",
    "round_ckks",
    "self_test",
]
