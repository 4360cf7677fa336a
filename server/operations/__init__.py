"""The operator's long-running processes: ``daemon`` (``fedtune server``: the
SuperLink with TLS and node auth, its runs directory) and ``control`` (the Control
API client: submit and follow runs, status, named deployments, node
registration); ``commands`` holds their ``fedtune`` commands (server, run, status,
deployment, keys).

May import :mod:`fedtune.common`, :mod:`fedtune.server.rundir` and
:mod:`fedtune.server.runtime`; never :mod:`fedtune.server.tools`.
"""
