"""Code shared by the fedtune server and client: pure functions and types
(config, data and sites, model and hub, loops, records, updates, metrics,
accounting and planning, calibration, keys, deployment, assets, errors), and the
commands that need neither side (``commands``: config, assets; ``cliargs``: config
references and the shipped scenarios).

Imports no :mod:`fedtune.client`, :mod:`fedtune.server` or
:mod:`fedtune.simulations` code; Flower only for record types.
"""
