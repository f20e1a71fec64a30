"""The server's unmask step as independent jobs, so a host can spread it over the cores it has.

Two kinds of job, both pure functions of plain data (bytes, ints, tuples), so they run under any
`map`-like callable the host passes to `SecAggServer` (the builtin `map` by default, a thread or a
process pool's `map` on a multi-core host; protocols/ itself starts no thread or process):

* `rebuild_secrets(SecretBatch)`: for a batch of owners, check the dealer's signature on every
  returned share, rebuild each secret from the t lowest valid holders (`reconstruct_many`: one
  Lagrange basis per distinct holder set), rebuild it again from the t highest when more than t
  are valid (a dealer that dealt shares of two polynomials is caught), and for a dropped party
  check its rebuilt mask key against its public key and derive the pairwise seeds with its
  surviving neighbours. The server reads the outcomes in owner order, so an abort names the same
  party, with the same message, whatever the map and the batching.
* `masks_over_range(MaskRange)`: sum(PRG(plus)) - sum(PRG(minus)) over one coordinate range
  [start, stop), seeking each AES-256-CTR stream to the range's first block (the PRG format of
  `primitives.prg`: the counter is one 128-bit big-endian integer from zero, so word i of the mask
  is keystream bytes [i*w, (i+1)*w) and a range starting at a multiple of 16 bytes starts at
  counter block start*w/16). The server adds each range into its accumulator.

Which pool: `cryptography`'s AES `update_into` releases the GIL on buffers of 2 KiB and more (a
Python thread keeps running during one 512 MiB call: measured, see benchmarks/scale.py), and so does
numpy's add, so a thread pool parallelises `masks_over_range`. Signature checks and the big-integer
Lagrange arithmetic of `rebuild_secrets` hold the GIL: a process pool parallelises both kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import IntegrityError
from ..primitives.kdf import LABEL_PAIRWISE_MASK, derive_key
from ..primitives.keys import x25519_agree_all, x25519_public
from ..primitives.prg import CHUNK_WORDS, ring_dtype
from ..primitives.shamir import reconstruct, reconstruct_many
from ._transcript import SHARE_KIND_MASK_KEY, share_statement

__all__ = [
    "JobMap",
    "MaskRange",
    "SecretBatch",
    "SecretJob",
    "SecretOutcome",
    "mask_ranges",
    "masks_over_range",
    "rebuild_secrets",
]

JobMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]
"""A `map`-like callable: `fn(job_function, jobs)` yields the results in the jobs' order."""


@dataclass(frozen=True)
class SecretJob:
    """One party's secret to rebuild: its self-mask seed (survivor) or its mask key (dropped)."""

    kind: int
    owner: int
    dealer_key: bytes
    """The Ed25519 key that signed the owner's shares (`_roster.signer_key`)."""
    shares: tuple[tuple[int, bytes, bytes], ...]
    """(holder, share, dealer signature), as the holders returned them."""
    mask_public_key: bytes = b""
    """Dropped owner only: the X25519 key its rebuilt mask key must match."""
    neighbours: tuple[tuple[int, bytes], ...] = ()
    """Dropped owner only: (surviving neighbour, its mask public key)."""
    forged: tuple[int, ...] = ()
    """Holders whose share the server already found forged (when it checked the signatures itself)."""


@dataclass(frozen=True)
class SecretBatch:
    """Owners rebuilt by one job; `transcript` binds the share signatures."""

    transcript: bytes
    threshold: int
    jobs: tuple[SecretJob, ...]
    verify: bool = True
    """False: the server checked every signature itself and `shares` holds only valid ones."""


@dataclass(frozen=True)
class SecretOutcome:
    """What one owner's job found: seeds to add / subtract, or the reason to abort."""

    owner: int
    valid: int
    """How many returned shares carried the dealer's signature."""
    forged: tuple[int, ...]
    """Holders whose share did not verify (discarded, never reconstructed from)."""
    error: str = ""
    """'' on success; else 'few', 'inconsistent', 'mismatch' or 'low-order:<peer>'."""
    plus: tuple[bytes, ...] = ()
    minus: tuple[bytes, ...] = ()


def _valid_shares(job: SecretJob, transcript: bytes, verify: bool) -> tuple[dict[int, bytes], tuple[int, ...]]:
    if not verify:
        return {holder: share for holder, share, _ in job.shares}, job.forged
    try:
        key = Ed25519PublicKey.from_public_bytes(job.dealer_key)
    except ValueError:
        return {}, tuple(sorted(h for h, _, _ in job.shares))
    valid: dict[int, bytes] = {}
    forged = []
    for holder, share, signature in job.shares:
        try:
            key.verify(signature, share_statement(transcript, job.kind, job.owner, holder, share))
        except (InvalidSignature, ValueError):
            forged.append(holder)
            continue
        valid[holder] = share
    return valid, tuple(sorted(forged))


def _rebuild_all(shares: list[dict[int, bytes]], t: int) -> list[bytes | None]:
    """Each secret, or None where its shares are inconsistent; one batched pass when all are sound."""
    try:
        return list(reconstruct_many(shares, t))
    except ValueError:
        pass
    out: list[bytes | None] = []
    for one in shares:
        try:
            out.append(reconstruct(one, t))
        except ValueError:
            out.append(None)
    return out


def rebuild_secrets(batch: SecretBatch) -> list[SecretOutcome]:
    """Check, rebuild and (for dropped owners) expand the secrets of one batch (see module docstring)."""
    t = batch.threshold
    checked = [_valid_shares(job, batch.transcript, batch.verify) for job in batch.jobs]
    enough = [i for i, (valid, _) in enumerate(checked) if len(valid) >= t]
    low = _rebuild_all([checked[i][0] for i in enough], t)
    extra = [i for i in enough if len(checked[i][0]) > t]
    top = _rebuild_all([{h: checked[i][0][h] for h in sorted(checked[i][0])[-t:]} for i in extra], t)
    secrets: dict[int, bytes | None] = dict(zip(enough, low, strict=True))
    for i, again in zip(extra, top, strict=True):
        # Every share here is one the dealer signed, so a second t-subset disagreeing means the
        # dealer itself dealt shares of different polynomials (a malicious client).
        if again is None or again != secrets[i]:
            secrets[i] = None
    out = []
    for i, job in enumerate(batch.jobs):
        valid, forged = checked[i]
        if i not in secrets:
            out.append(SecretOutcome(owner=job.owner, valid=len(valid), forged=forged, error="few"))
            continue
        secret = secrets[i]
        if secret is None:
            out.append(SecretOutcome(owner=job.owner, valid=len(valid), forged=forged, error="inconsistent"))
            continue
        if job.kind != SHARE_KIND_MASK_KEY:
            out.append(SecretOutcome(owner=job.owner, valid=len(valid), forged=forged, minus=(secret,)))
            continue
        out.append(_pairwise_seeds(job, secret, batch.transcript, len(valid), forged))
    return out


def _pairwise_seeds(
    job: SecretJob, mask_sk: bytes, transcript: bytes, valid: int, forged: tuple[int, ...]
) -> SecretOutcome:
    if x25519_public(mask_sk) != job.mask_public_key:
        return SecretOutcome(owner=job.owner, valid=valid, forged=forged, error="mismatch")
    try:
        agreed = x25519_agree_all(mask_sk, dict(job.neighbours))
    except IntegrityError as exc:
        return SecretOutcome(owner=job.owner, valid=valid, forged=forged, error=f"low-order:{exc.peer_id}")
    plus: list[bytes] = []
    minus: list[bytes] = []
    v = job.owner
    for u, secret in agreed.items():
        seed = derive_key(secret, label=LABEL_PAIRWISE_MASK, transcript=transcript, a=min(u, v), b=max(u, v))
        # u added +mask when u < v and -mask when u > v; undo it.
        (minus if u < v else plus).append(seed)
    return SecretOutcome(owner=v, valid=valid, forged=forged, plus=tuple(plus), minus=tuple(minus))


@dataclass(frozen=True)
class MaskRange:
    """sum(PRG(plus)) - sum(PRG(minus)) over words [start, stop) of Z_(2^ring_bits)."""

    start: int
    stop: int
    ring_bits: int
    plus: tuple[bytes, ...]
    minus: tuple[bytes, ...]


def mask_ranges(length: int, parts: int, ring_bits: int) -> list[tuple[int, int]]:
    """Split [0, length) into at most `parts` ranges whose starts fall on whole AES blocks.

    Starts are multiples of `CHUNK_WORDS` (so of 16 bytes for every ring width), so each range's
    keystream begins at an integral counter block.
    """
    del ring_bits  # CHUNK_WORDS words are a whole number of 16-byte blocks for 16-, 32- and 64-bit words
    parts = max(1, parts)
    chunks = -(-length // CHUNK_WORDS)
    per = -(-chunks // parts)
    bounds = []
    for first in range(0, chunks, per):
        bounds.append((first * CHUNK_WORDS, min((first + per) * CHUNK_WORDS, length)))
    return bounds or [(0, length)]


def masks_over_range(job: MaskRange) -> npt.NDArray[np.unsignedinteger]:
    """The signed mask sum over one range (see module docstring for the keystream seek)."""
    dtype = ring_dtype(job.ring_bits)
    width = job.stop - job.start
    if (job.start * dtype.itemsize) % 16:
        raise ValueError("a mask range must start on a 16-byte keystream block")
    out = np.zeros(width, dtype=dtype)
    counter = (job.start * dtype.itemsize // 16).to_bytes(16, "big")
    streams = [(Cipher(algorithms.AES(s), modes.CTR(counter)).encryptor(), True) for s in job.plus]
    streams += [(Cipher(algorithms.AES(s), modes.CTR(counter)).encryptor(), False) for s in job.minus]
    chunk = CHUNK_WORDS
    nbytes = chunk * dtype.itemsize
    zeros = bytes(nbytes)
    buffer = bytearray(nbytes + 15)  # update_into needs block_size - 1 spare bytes
    view = np.frombuffer(buffer, dtype=dtype, count=chunk)
    for first in range(0, width, chunk):
        last = min(first + chunk, width)
        size = last - first
        source = zeros if size == chunk else zeros[: size * dtype.itemsize]
        mask = view[:size]
        target = out[first:last]
        for stream, positive in streams:
            stream.update_into(source, buffer)
            if positive:
                np.add(target, mask, out=target)
            else:
                np.subtract(target, mask, out=target)
    return out
