"""One error family for the project: every error says what is wrong and what to do."""

from __future__ import annotations


class RenkeiError(Exception):
    """Base of every error renkei raises on purpose. `str(err)` is shown to the operator."""

    exit_code: int = 1


class ConfigError(RenkeiError):
    """The network configuration file is missing, unreadable or invalid."""

    exit_code = 2


class UsageError(RenkeiError):
    """A command was given arguments that cannot work (unknown site, missing file...)."""

    exit_code = 2


class InvalidUID(RenkeiError):
    """A DICOM UID is not a valid UID (only digits and dots, <= 64 chars, no empty or leading-zero part)."""


class StorageError(RenkeiError):
    """Object storage could not be read or written."""


class IntegrityError(StorageError):
    """Bytes read back do not match the SHA-256 recorded for them."""


class CatalogError(RenkeiError):
    """The catalog could not be read or written."""


class CatalogDamaged(CatalogError):
    """A catalog file or log entry is missing, truncated or altered: restore or rebuild the catalog."""


class CommitOutcomeUnknown(CatalogError):
    """A catalog commit's reply was lost and its entry could not be read back: retry later."""


class RejectedData(CatalogError):
    """The catalog refused what it was given (not a failure to reach it): retrying cannot help."""


class StudyOfAnotherSite(RejectedData):
    """A site tried to register a study that the catalog holds as another site's."""


class PolicyError(RenkeiError):
    """A sharing decision could not be made (unknown study or site)."""


class PeerError(RenkeiError):
    """A DICOM peer refused, failed or could not be reached."""
