"""Parsl integration: proxies as one option on an executor in an ordinary Parsl ``Config``.

Arguments and results above the threshold travel as proxies, so their bytes never pass through
the HighThroughputExecutor's interchange. (Planned: see the project's Parsl issue.)
"""
