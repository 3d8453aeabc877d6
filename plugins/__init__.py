"""Framework integrations, installed as ``proxy_patterns.plugins``.

Each module translates one framework's task lifecycle into calls on the core (policy, store,
ownership); a plugin never imports another plugin. Each framework is an extra of the package
(``pip install 'proxy-patterns[dask]'``): a plugin imports it inside
:func:`proxy_patterns.extras.requires_extra`, so that without it the error says what to install.
"""
