"""Privacy accounting: DP-SGD events, interchangeable accountants, calibration and the ledger."""

from .accountants import (
    ACCOUNTANTS,
    GROUP_OF_TWO_SPLITS,
    NEIGHBOURING,
    Accountant,
    Neighbouring,
    PLDAccountant,
    PRVAccountant,
    RDPAccountant,
    check_neighbouring,
    group_of_two_epsilon,
    make_accountant,
    neighbouring_statement,
    register_accountant,
)
from .calibration import noise_for_epsilon
from .events import DPSGDEvent
from .integer_noise import (
    IntegerNoiseEvent,
    SkellamRDPAccountant,
    discrete_gaussian_rdp,
    poisson_subsampled_rdp,
    rdp_to_epsilon,
    skellam_mu_for_epsilon,
    skellam_rdp,
)
from .ledger import PrivacyLedger
from .noise import NOISE_GENERATORS, csprng_gaussian

__all__ = [
    "ACCOUNTANTS",
    "GROUP_OF_TWO_SPLITS",
    "NEIGHBOURING",
    "NOISE_GENERATORS",
    "Accountant",
    "DPSGDEvent",
    "IntegerNoiseEvent",
    "Neighbouring",
    "PLDAccountant",
    "PRVAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "SkellamRDPAccountant",
    "check_neighbouring",
    "csprng_gaussian",
    "discrete_gaussian_rdp",
    "group_of_two_epsilon",
    "make_accountant",
    "neighbouring_statement",
    "noise_for_epsilon",
    "poisson_subsampled_rdp",
    "rdp_to_epsilon",
    "register_accountant",
    "skellam_mu_for_epsilon",
    "skellam_rdp",
]
