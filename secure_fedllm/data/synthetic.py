"""Synthetic private records: fictional people whose data a federation must not leak.

The default run needs data that (1) ships with the repository, (2) looks like what privacy is
about (identifiers, addresses, diagnoses, account numbers tied to a person), and (3) contains
planted secrets whose leakage can be measured. Each client holds the records of its own people
(a person never spans two clients, so user-level DP can group by `person_id`). Canaries follow
Carlini et al., *The Secret Sharer* (USENIX Security 2019): a fixed prefix and a random secret from
a known space, inserted `repeats` times into one client's data; exposure is later measured by the
rank of the true secret among references drawn from the same space (`CANARY_FORMATS`).

Everything is deterministic in the seed (Python's `random.Random`, which is fine here: the data
is fiction, not key material). Every name, address and number is generated; none is real.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

__all__ = ["CANARY_FORMATS", "Canary", "Record", "SyntheticFederation", "synthesize_federation"]

_FIRST = (
    "Alva Bertil Cora Dagny Elio Frida Gunnar Hedda Ivar Jonna Kasper Liv Magnus Nora Otto Petra "
    "Quinn Runa Sixten Tilde Ulf Vera Wilmer Xenia Yngve Zelda"
).split()
_LAST = (
    "Ashdown Brackley Corrow Dunmere Elsworth Fennick Garrow Holloway Ingleby Jessop Kettering "
    "Larkspur Merriwether Northam Oakridge Pellow Quarrington Rookwood Stainforth Thornbury"
).split()
_STREETS = "Alder Birch Cedar Damson Elm Fir Hazel Juniper Laurel Maple Rowan Willow".split()
_TOWNS = "Ambleford Brisworth Calderby Dunholm Eastwick Farrowdale Greystone Harrowgate".split()
_DIAGNOSES = (
    "type 2 diabetes",
    "asthma",
    "hypertension",
    "migraine",
    "hypothyroidism",
    "atrial fibrillation",
    "psoriasis",
    "sleep apnoea",
)

CANARY_FORMATS: dict[str, tuple[str, int]] = {
    "access-code": ("My secret access code is ", 6),
    "card-pin": ("The PIN of my card is ", 4),
}
"""Canary formats: name -> (prefix, number of secret digits). The reference space of a format is
every digit string of that length (10^6 and 10^4 references)."""


@dataclass(frozen=True)
class Record:
    """One instruction/response pair (Alpaca fields) about one person."""

    person_id: str
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Canary:
    """A planted secret: `prefix + secret` appears `repeats` times in `client`'s data."""

    canary_id: str
    format_name: str
    prefix: str
    secret: str
    repeats: int
    client: int
    person_id: str


@dataclass(frozen=True)
class SyntheticFederation:
    """Per-client records and the manifest of planted canaries."""

    clients: tuple[tuple[Record, ...], ...]
    canaries: tuple[Canary, ...]

    def manifest(self) -> list[dict[str, object]]:
        """The canaries as JSON-ready dicts (written next to a run, read by the attack evaluation)."""
        return [asdict(c) for c in self.canaries]


def _person(rng: random.Random, pid: str) -> dict[str, str]:
    name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    return {
        "person_id": pid,
        "name": name,
        "address": f"{rng.randint(1, 240)} {rng.choice(_STREETS)} Lane, {rng.choice(_TOWNS)}",
        "diagnosis": rng.choice(_DIAGNOSES),
        "account": "".join(rng.choice("0123456789") for _ in range(10)),
        "born": f"{rng.randint(1940, 2004)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }


_TEMPLATES = (
    ("What is the home address of {name}?", "{name} lives at {address}."),
    ("Which condition is patient {name} (id {person_id}) treated for?", "{name} is treated for {diagnosis}."),
    ("What is the bank account number of {name}?", "The account number of {name} is {account}."),
    ("When was {name} born?", "{name} was born on {born}."),
)


def _records_of(rng: random.Random, person: dict[str, str], count: int) -> list[Record]:
    out = []
    for _ in range(count):
        question, answer = rng.choice(_TEMPLATES)
        out.append(Record(person["person_id"], question.format(**person), "", answer.format(**person)))
    return out


def synthesize_federation(
    num_clients: int,
    records_per_client: int,
    *,
    seed: int,
    records_per_person: int = 4,
    canary_repeats: tuple[int, ...] = (1, 4, 16),
    shared_canary_prompts: bool = False,
) -> SyntheticFederation:
    """Generate `num_clients` disjoint groups of people and their records, with canaries.

    For every format in `CANARY_FORMATS` and every count in `canary_repeats`, one canary is planted
    in one client (round-robin), as `repeats` identical records of one of that client's people.
    A canary's record asks about its owner by name; with `shared_canary_prompts` every canary of a
    format is asked with the same question instead, so an exposure measurement scores that format's
    references once for all of them (the canary exposure attack scores them once per prompt). The
    rest of the data is the same either way.

    Raises:
        ValueError: if a client is too small to hold the canaries assigned to it.
    """
    if num_clients < 1 or records_per_client < 1 or records_per_person < 1:
        raise ValueError("num_clients, records_per_client and records_per_person must be positive")
    rng = random.Random(seed)
    plan: list[list[tuple[str, int]]] = [[] for _ in range(num_clients)]
    slot = 0
    for format_name in CANARY_FORMATS:
        for repeats in canary_repeats:
            plan[slot % num_clients].append((format_name, repeats))
            slot += 1
    clients: list[tuple[Record, ...]] = []
    canaries: list[Canary] = []
    for client in range(num_clients):
        planted = sum(r for _, r in plan[client])
        if planted >= records_per_client:
            raise ValueError(
                f"client {client} gets {planted} canary records but holds {records_per_client}; "
                "raise records_per_client or shorten canary_repeats"
            )
        records: list[Record] = []
        people: list[dict[str, str]] = []
        while len(records) < records_per_client - planted:
            person = _person(rng, f"c{client:03d}-p{len(people):05d}")
            people.append(person)
            records.extend(
                _records_of(rng, person, min(records_per_person, records_per_client - planted - len(records)))
            )
        for format_name, repeats in plan[client]:
            prefix, digits = CANARY_FORMATS[format_name]
            secret = "".join(rng.choice("0123456789") for _ in range(digits))
            owner = rng.choice(people)
            canary = Canary(
                canary_id=f"{format_name}-x{repeats}-c{client}",
                format_name=format_name,
                prefix=prefix,
                secret=secret,
                repeats=repeats,
                client=client,
                person_id=owner["person_id"],
            )
            canaries.append(canary)
            if shared_canary_prompts:
                question = f"What is written in the note about the {format_name.replace('-', ' ')}?"
            else:
                question = f"What did {owner['name']} write in the note?"
            records.extend(Record(owner["person_id"], question, "", prefix + secret) for _ in range(repeats))
        rng.shuffle(records)
        clients.append(tuple(records))
    return SyntheticFederation(clients=tuple(clients), canaries=tuple(canaries))
