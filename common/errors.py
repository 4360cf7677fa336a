"""The one exception hierarchy of fedtune.

Every error names the problem and, where there is one, the fix.
"""

from __future__ import annotations


class FedtuneError(Exception):
    """Base class of every error fedtune raises on purpose."""


class ConfigError(FedtuneError, ValueError):
    """A run configuration is malformed.

    Parameters
    ----------
    problems : list[str]
        One line per bad key, each naming the key and what it expects.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"invalid configuration:\n  - {lines}")


class DataError(FedtuneError, ValueError):
    """A site's data file is missing, unreadable or does not fit the config.

    ``public``: the same problem in words built from the run's config and the
    file's layout only (never a path, a value or a record), which a site may send
    the operator; empty: the operator learns the error's class only.
    """

    def __init__(self, message: str, *, public: str = "") -> None:
        super().__init__(message)
        self.public = public


class ModelError(FedtuneError, ValueError):
    """A model cannot be loaded or does not fit the configured task."""


class AssetError(FedtuneError, RuntimeError):
    """An embedded offline asset (default model or data) cannot be fetched."""


class PrivacyError(FedtuneError, RuntimeError):
    """Differential-privacy setup or accounting failed."""


# what a site's error reply starts with when its own policy declines the run
# (client/policy.py); the server names the site and the rule
SITE_POLICY = "SitePolicy"
# In a site's error reply: a configuration or data error (its one line follows);
# deterministic, so the server stops the run rather than retrying the round.
CONFIG_FAILURE = "a configuration error on the site"


class PrivacyBudgetExhausted(PrivacyError):
    """Training this round would exceed the site's privacy budget."""


class KeyMaterialError(FedtuneError, ValueError):
    """A certificate or key file is missing, unreadable or of the wrong kind."""


class DeploymentError(FedtuneError, RuntimeError):
    """A SuperLink/SuperNode cannot be started or reached as configured."""
