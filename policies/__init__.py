"""Statement classification and policy decisions, pure and I/O-free.

``classify`` (with ``pgreading``, ``sgreading``, ``lexing``, ``reading``,
``sideeffects``, ``cache``) turns SQL text into kinds; ``prepared`` tracks a
session's SQL-level prepared statements; ``loader`` reads policy files into
``model``; ``evaluate`` (with ``globs``) decides allow / review / deny;
``testing`` and ``cli`` are the security team's tools on the same path.
Only ``loader`` and ``testing`` read files; nothing here opens sockets.
"""
