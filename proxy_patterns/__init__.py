"""Move large task data by reference in Dask, Parsl and Globus Compute, with object proxies.

The core (this package) knows no framework: :mod:`~proxy_patterns.policy` decides what is
proxied, :mod:`~proxy_patterns.store` keeps the bytes (zero-copy shared memory by default, or
any ProxyStore connector). The framework integrations live in :mod:`proxy_patterns.plugins`.
"""

from proxy_patterns.availability import StoreAccessError, StoreUnavailableError
from proxy_patterns.policy import ProxyPolicy
from proxy_patterns.proxy import OpaqueProxy, is_proxy, key_of, proxy
from proxy_patterns.store import count_entries, count_objects, get_store, put

__all__ = [
    "OpaqueProxy",
    "ProxyPolicy",
    "StoreAccessError",
    "StoreUnavailableError",
    "count_entries",
    "count_objects",
    "get_store",
    "is_proxy",
    "key_of",
    "proxy",
    "put",
]
__version__ = "0.1.0"
