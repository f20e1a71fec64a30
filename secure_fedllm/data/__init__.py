"""Client data: sources, the synthetic private-records generator, one chat-template policy, batching."""

from .chat import IGNORE_INDEX, ChatTemplate, Example
from .sources import FederationData, TextRecord, load_alpaca, load_federation_data, partition
from .synthetic import CANARY_FORMATS, Canary, Record, SyntheticFederation, synthesize_federation
from .tokenized import Batch, TokenizedDataset

__all__ = [
    "CANARY_FORMATS",
    "IGNORE_INDEX",
    "Batch",
    "Canary",
    "ChatTemplate",
    "Example",
    "FederationData",
    "Record",
    "SyntheticFederation",
    "TextRecord",
    "TokenizedDataset",
    "load_alpaca",
    "load_federation_data",
    "partition",
    "synthesize_federation",
]
