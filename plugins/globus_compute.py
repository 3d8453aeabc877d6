"""Globus Compute integration: adapters that keep submissions under the service's size limits.

Arguments and results above the threshold are replaced by proxies inside the function and its
submission, so a 100 MB array no longer hits the 10 MB payload limit. (Planned: see the
project's roadmap.)
"""

from __future__ import annotations

from proxy_patterns.extras import requires_extra

with requires_extra("globus", __name__):
    # The adapters will be built on the SDK; importing it now checks the extra is installed,
    # so the module already behaves as it will.
    import globus_compute_sdk  # noqa: F401
