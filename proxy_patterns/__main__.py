"""``python -m proxy_patterns`` is the ``proxy-patterns`` command."""

from proxy_patterns.cli import main

raise SystemExit(main())
