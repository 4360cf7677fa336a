"""The ServerApp's runtime: what runs inside Flower's ServerApp process, round by
round. ``app`` (wiring; ``fedtune.server.runtime.app:app`` is pyproject's
serverapp), ``rounds`` (the loop, retries), ``strategy`` + ``registry``,
``decoding`` + ``validation`` (a reply's update decoded and checked), ``stats``,
``recorder`` (eval, checkpoint, metrics line each round), ``checkpoint`` (writes
the run directory), ``trained`` (a saved round read back), ``resume``,
``selection`` (best round, early stopping), ``central_eval`` (the held-out set
each round), ``central_dp``, ``secagg``, ``polling``, ``privacy_plan`` (the plan
before round 1), ``calibrate``, ``personalize``, ``events`` (TensorBoard).

May import :mod:`fedtune.common`, :mod:`fedtune.server.rundir` and itself; never
:mod:`fedtune.server.tools` or :mod:`fedtune.server.operations`
(tests/test_layering.py).
"""
