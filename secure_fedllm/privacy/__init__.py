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
from .ledger import PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "GROUP_OF_TWO_SPLITS",
    "NEIGHBOURING",
    "Accountant",
    "DPSGDEvent",
    "Neighbouring",
    "PLDAccountant",
    "PRVAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "check_neighbouring",
    "group_of_two_epsilon",
    "make_accountant",
    "neighbouring_statement",
    "noise_for_epsilon",
    "register_accountant",
]
