"""Client data: sources, a site's own records, the synthetic generator, one chat template, batching."""

from .chat import IGNORE_INDEX, ChatTemplate, Example
from .site_data import SiteDataSpec, load_site_records, split_heldout
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
    "SiteDataSpec",
    "SyntheticFederation",
    "TextRecord",
    "TokenizedDataset",
    "load_alpaca",
    "load_federation_data",
    "load_site_records",
    "partition",
    "split_heldout",
    "synthesize_federation",
]
