"""After the run, on its directory: ``report`` (+ ``runs``: the directory read
back, ``plots``), ``export``, ``predict`` (``fedtune predict`` and ``fedtune
evaluate``: a trained model on a file), ``compare`` (runs side by side, paired
bootstrap) and ``audit`` (canaries and membership inference); ``commands`` holds
their ``fedtune`` commands. None writes into the run directory but the report's
page.

May import :mod:`fedtune.common`, :mod:`fedtune.server.rundir` and
:mod:`fedtune.server.runtime`; never :mod:`fedtune.server.operations`. The
runtime never imports this package.
"""
