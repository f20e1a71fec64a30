"""Privacy accounting: DP-SGD events, interchangeable accountants, calibration and the ledger."""

from .accountants import ACCOUNTANTS, Accountant, PRVAccountant, RDPAccountant, make_accountant, register_accountant
from .calibration import noise_for_epsilon
from .events import DPSGDEvent
from .ledger import PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "DPSGDEvent",
    "PRVAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "make_accountant",
    "noise_for_epsilon",
    "register_accountant",
]
