"""The top floor: the ``fedtune`` dispatcher (``cli``: it only wires each side's
commands), the simulations' commands (``commands``: simulate, sweep, plan), the
simulation driver that starts both sides (``driver``, ``engine``, ``console``),
``sweep``, and the shipped YAML scenarios (package data).

May import :mod:`fedtune.common`, :mod:`fedtune.client` and
:mod:`fedtune.server`; nothing imports it (the scenarios are read as data).
"""
