"""What each site (client) owns: its state folder, secrets and release bindings.

Nothing here may be chosen or lowered by the server.
"""

from .policy import (
    SITES_ENV,
    SitePolicy,
    check_setting,
    load_identity_key,
    site_policy_path,
    site_security_policy,
)
from .state import BindingBook, ReleaseBinding, SiteState, SiteStateError, release_tag

__all__ = [
    "SITES_ENV",
    "BindingBook",
    "ReleaseBinding",
    "SitePolicy",
    "SiteState",
    "SiteStateError",
    "check_setting",
    "load_identity_key",
    "release_tag",
    "site_policy_path",
    "site_security_policy",
]
