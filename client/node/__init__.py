"""The site's long-lived node process: ``daemon`` (``fedtune client``: checks,
then runs the worker and the SuperNode), ``supervisor`` (keeps both up),
``worker`` (the warm site process: model, data and ledger loaded once; it runs
the ClientApp's code, :mod:`fedtune.client.app`), ``channel`` (the Unix socket,
its framing and the message constants) and ``forwarder`` (the thin per-message
ClientApp Flower spawns, no torch: pyproject's clientapp).

No module here but the forwarder imports the forwarder, and only the worker (and
the forwarder's in-process fallback) reaches :mod:`fedtune.client.app`
(tests/test_layering.py).
"""
