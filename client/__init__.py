"""fedtune client: the site. Two groups, by when they run (README's Layout):

- the ClientApp, per message (this package's modules): ``app`` (wiring),
  ``trainer``, ``dpsgd``, ``privacy``, ``ledger``, ``recipe``, ``site``,
  ``calibrate``, ``personalize``, ``policy`` (the site's rules), ``mods``;
- :mod:`.node`, the long-lived node process behind ``fedtune client``.

``commands`` holds the site's ``fedtune`` commands (client, privacy). May import
:mod:`fedtune.common` only (never the server); the ClientApp's modules never
import :mod:`.node`. Imported by the top floor (:mod:`fedtune.simulations`).
"""
