"""Globus Compute integration: adapters that keep submissions under the service's size limits.

Arguments and results above the threshold are replaced by proxies inside the function and its
submission, so a 100 MB array no longer hits the 10 MB payload limit. (Planned: see the
project's roadmap.)
"""
