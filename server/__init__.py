"""fedtune server, grouped by when its code runs (README's Layout).

- :mod:`.runtime`: the ServerApp's round loop and what it needs (Flower runs it);
- :mod:`.operations`: the operator's long-running processes (``fedtune server``,
  the Control API client behind ``run``/``status``/``keys register``);
- :mod:`.tools`: after the run, on its directory (report, export, predict,
  compare, audit);
- :mod:`.rundir`: every file name in a run directory and the ``round-NNNN`` naming.

May import :mod:`fedtune.common` only (never the client). The runtime imports
neither operations nor tools; operations and tools may import the runtime, never
each other; all ask :mod:`.rundir`. Imported by the top floor
(:mod:`fedtune.simulations`) and by nothing else.
"""
