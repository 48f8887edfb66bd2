"""The exception tree: one root, translated at the boundaries, classified once.

::

    ImagepushdError                 every error this package raises on purpose (exit 1)
    ├── UsageError                  bad command-line input (exit 2)
    ├── InvalidReferenceError       an image reference does not parse or normalise (exit 2)
    ├── ConfigError                 the configuration is invalid (lists every problem; exit 2)
    ├── ContainerdError             reading containerd's root, metadata or content
    │   ├── RootNotFoundError       no containerd root (names every path tried)
    │   ├── BoltFormatError         meta.db is not a bbolt file or its tree is inconsistent
    │   │   └── MetadataFormatError a value in containerd's schema does not decode
    │   ├── SnapshotBusyError       meta.db kept changing under every snapshot attempt
    │   ├── UnsupportedSchemaError  containerd's metadata schema is one we cannot read
    │   ├── NamespaceNotFoundError
    │   ├── ImageNotFoundError
    │   ├── MissingContentError     blobs an operation needs are absent (lists them)
    │   └── BlobCorruptError        a blob's bytes do not match its digest or size
    ├── ManifestError               a manifest or index is malformed or unsupported
    ├── ArchiveError                an image archive is unreadable, compressed, or lacks the image
    ├── PushInterrupted             the daemon is stopping; the upload checkpointed
    ├── RegistryError               a registry refused or failed a request (status, OCI codes)
    │   ├── RegistryAuthError       credentials missing, rejected, or insufficient
    │   └── RegistryConnectionError no HTTP answer: refused, reset, timed out, TLS failure
    ├── StateError                  the state file is corrupt, unreadable, or from a newer version
    ├── ListenError                 the metrics endpoint cannot listen (address taken, bad path)
    └── OutputError                 writing an export or other output failed

The CLI turns any ``ImagepushdError`` into one line on stderr and its ``exit_code``.
Lower layers never let ``OSError`` or decoder exceptions escape unclassified.
"""

from __future__ import annotations

from collections.abc import Sequence


class ImagepushdError(Exception):
    """Root of every error this package raises deliberately."""

    exit_code = 1


class UsageError(ImagepushdError):
    """The command line asked for something malformed."""

    exit_code = 2


class InvalidReferenceError(ImagepushdError):
    """An image reference is malformed; the message names the input and the rule it breaks.

    Exit 2 because a reference always comes from the user (argv or config), never from a
    failing system.
    """

    exit_code = 2


class ConfigError(ImagepushdError):
    """The configuration is invalid; ``problems`` lists every one (exit 2).

    One error for the whole file, so an operator fixes every problem in one go.
    """

    exit_code = 2

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(
            f"{source}: {len(problems)} problem(s): " + "; ".join(problems)
            if len(problems) > 1
            else f"{source}: {problems[0]}"
        )


class ContainerdError(ImagepushdError):
    """Something about containerd's root, metadata or content store."""


class RootNotFoundError(ContainerdError):
    """No containerd root holding a meta.db was found."""

    def __init__(self, tried: Sequence[str]) -> None:
        self.tried = tuple(tried)
        super().__init__(
            "no containerd root found (looked for io.containerd.metadata.v1.bolt/meta.db in "
            + ", ".join(self.tried)
            + "); pass --root"
        )


class BoltFormatError(ContainerdError):
    """meta.db is not a bbolt file, or its tree is structurally inconsistent."""


class MetadataFormatError(BoltFormatError):
    """A value in containerd's schema does not decode (torn read or corruption)."""


class SnapshotBusyError(ContainerdError):
    """meta.db advanced during every attempt to take a consistent snapshot."""


class UnsupportedSchemaError(ContainerdError):
    """containerd's metadata uses a schema this reader does not understand."""


class NamespaceNotFoundError(ContainerdError):
    """The requested containerd namespace does not exist."""


class ImageNotFoundError(ContainerdError):
    """The requested image name does not exist in the namespace."""


class MissingContentError(ContainerdError):
    """Blobs needed by an operation are not in the content store."""

    def __init__(self, what: str, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        if not self.missing:
            super().__init__(what)
            return
        shown = ", ".join(self.missing[:5])
        more = f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else ""
        super().__init__(f"{what}: {len(self.missing)} blob(s) missing: {shown}{more}")


class BlobCorruptError(ContainerdError):
    """A blob's content does not hash to its digest or has the wrong size."""


class ManifestError(ImagepushdError):
    """A manifest or index is malformed, too large, or of an unsupported type."""


class ArchiveError(ImagepushdError):
    """An image archive cannot be used: not a tar, compressed, malformed, or without the image.

    Blobs an archive lacks or holds corrupted are :class:`MissingContentError` and
    :class:`BlobCorruptError`, as for the content store.
    """


class PushInterrupted(ImagepushdError):
    """A push stopped between chunks because the daemon is stopping (resumable later)."""


class RegistryError(ImagepushdError):
    """A registry answered with an error, classified once for the retry policy.

    ``temporary`` is decided here, from the status and OCI error codes, and nowhere else.
    """

    TEMPORARY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
    TEMPORARY_CODES = frozenset({"TOOMANYREQUESTS", "UNAVAILABLE"})
    #: Answers that speak for the whole registry (a gateway or the service itself is down).
    UNAVAILABLE_STATUS = frozenset({502, 503, 504})

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        codes: Sequence[str] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.codes = tuple(codes)
        self.retry_after = retry_after

    def is_temporary(self) -> bool:
        """Whether repeating the same request later may succeed."""
        return self.status in self.TEMPORARY_STATUS or bool(
            self.TEMPORARY_CODES.intersection(self.codes)
        )

    def is_unavailable(self) -> bool:
        """Whether the registry as a whole may be out of service, not just this request.

        Such a failure concerns every job of the registry, so the daemon's registry health
        (``push/registry/health.py``) waits for the registry once instead of each job on its own.
        """
        return self.status in self.UNAVAILABLE_STATUS or "UNAVAILABLE" in self.codes


class RegistryAuthError(RegistryError):
    """Authentication failed or the credentials lack the needed scope: never retried."""

    def is_temporary(self) -> bool:
        """Auth failures do not heal by waiting."""
        return False

    def is_unavailable(self) -> bool:
        """A refusal is an answer: the registry is serving."""
        return False


class RegistryConnectionError(RegistryError):
    """The request got no HTTP answer (connection refused or reset, timeout, TLS failure)."""

    def __init__(
        self, message: str, *, temporary: bool = True, tls_handshake: bool = False
    ) -> None:
        super().__init__(message)
        self._temporary = temporary
        self.tls_handshake = tls_handshake

    def is_temporary(self) -> bool:
        """Connection failures are worth retrying, except TLS verification failures."""
        return self._temporary

    def is_unavailable(self) -> bool:
        """No answer at all: the registry (or the way to it) is down, unless TLS refused it."""
        return self._temporary


class StateError(ImagepushdError):
    """The state file cannot be used: corrupt, unreadable, locked, or written by a newer version.

    The message names the file, the problem and the recovery command; the file itself is never
    reset or deleted to get past the problem, since it may be the only record of what was pushed.
    """


class ListenError(ImagepushdError):
    """The metrics endpoint cannot listen where the configuration says (checked at start)."""


class OutputError(ImagepushdError):
    """Writing output (an export, a file) failed."""
