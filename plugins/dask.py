"""Dask integration: proxy large task arguments and results of a ``distributed.Client``.

Registered on a client in one call, it puts every argument and result above the policy's
threshold in the store so that only small proxies travel through the scheduler, and evicts
each key when the task graph forgets it. (Planned: see the project's Dask plugin issue.)
"""
