"""Framework integrations, installed as ``proxy_patterns.plugins``.

Each module translates one framework's task lifecycle into calls on the core (policy, store,
ownership); a plugin never imports another plugin.
"""
