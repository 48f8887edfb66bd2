"""Blob upload with bounded memory.

Existence check, cross-repo mount, monolithic and chunked uploads, resume from the
registry's offset, and digest verification before the closing PUT.

Bodies are streamed from file offsets in small reads, so memory does not grow with blob size.
Every byte is hashed as it is read for sending; the hash state is kept at the last offset the
registry acknowledged, so resuming after a broken chunk rehashes at most the bytes the
registry kept beyond it (read locally, never sent twice).

The registry checks the digest too, but verification stays here, in the same pass as the
send: a corrupt local blob must never reach a registry whole (a monolithic body is cut before
its last byte, a chunked one gets no closing PUT), whatever that registry does with it. It is
most of what a push costs the client: on a 2 GiB push (bench/push.py, sha256 with SHA-NI)
about 0.5 of 0.9 CPU s per GiB, the rest the kernel's send (as for ``curl -T``); the whole is
within a few percent of ``curl -T`` plus ``openssl dgst`` of the same files, and reads of
256 KiB to 4 MiB cost the same.

What a broken chunk costs depends on the registry. distribution 3.x answers GET status with
the bytes it really kept, so nothing is sent twice. distribution 2.8 keeps the partial bytes
but refuses every later request on the session (its signed ``_state`` offset no longer matches
the data: 404 ``BLOB_UPLOAD_INVALID``), so everything sent into that session is lost whatever
the chunk size. Registries that keep acknowledged chunks and drop a partial one lose at most
that chunk: which is what the adaptive chunk size (:class:`ChunkSizer`) bounds.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from imagepushd.blobs import BlobSource
from imagepushd.errors import BlobCorruptError, ContainerdError, PushInterrupted, RegistryError
from imagepushd.oci import Descriptor
from imagepushd.push.registry.auth import repository_scope
from imagepushd.push.registry.bodylimit import BodyLimit
from imagepushd.push.registry.client import RegistryClient
from imagepushd.push.registry.hosts import is_ecr, is_google_artifact_registry
from imagepushd.units import human_size

log = logging.getLogger(__name__)

MiB = 1 << 20
READ_SIZE = 256 << 10
SESSION_ATTEMPTS = 3
#: Answers about the upload session itself (bad state, unknown, out of range): a new one helps.
SESSION_REFUSED = frozenset({400, 404, 416})
MAX_MOUNT_SOURCES = 3
MAX_PARTS = 4000
# Adaptive chunks, used unless a chunk size is configured. Each PATCH costs a registry round
# trip and distribution fsyncs every chunk before answering (~80 ms here), so fast links want
# large chunks (fixed 16 MiB chunks made 1 GiB pushes slower than ctr's single PUT; 64 MiB did
# not); a slow link or a cut wants small ones (a chunk is what a stop waits for and, on
# registries that keep acknowledged chunks, the most a cut loses). So: start at 8 MiB, aim for
# chunks that take 2 s at the throughput just seen, at most doubling, never above 64 MiB nor a
# quarter of the blob (one lost chunk costs at most 25% more), never below 1 MiB. On a 1 GiB
# push (bench/push.py) that was no slower than fixed 64 MiB chunks.
ADAPTIVE_START = 8 * MiB
ADAPTIVE_MAX = 64 * MiB
ADAPTIVE_MIN = 1 * MiB
ADAPTIVE_SECONDS = 2.0
ADAPTIVE_PARTS = 4
# Without a configured chunk size, blobs up to this size go in one PUT (a cut costs them all).
MONOLITHIC_MAX = 16 * MiB
OCTET_STREAM = "application/octet-stream"


class Outcome(enum.Enum):
    """How a blob came to be in the target repository."""

    EXISTS = "exists"
    MOUNTED = "mounted"
    UPLOADED = "uploaded"


@dataclass(frozen=True)
class UploadResult:
    """The outcome of one blob and the bytes sent for it (including any resent)."""

    digest: str
    outcome: Outcome
    bytes_sent: int


@dataclass(frozen=True)
class ChunkLimits:
    """What one registry accepts: chunk size bounds and whether it chunks at all."""

    minimum: int = 0
    maximum: int | None = None
    chunked: bool = True


def registry_limits(host: str) -> ChunkLimits:
    """Known per-registry limits (GHCR ≤ 4 MiB chunks, ECR ≥ 5 MiB, Artifact Registry none)."""
    if host == "ghcr.io":
        return ChunkLimits(maximum=4 * MiB)
    if is_ecr(host):
        return ChunkLimits(minimum=5 * MiB)
    if is_google_artifact_registry(host):
        return ChunkLimits(chunked=False)
    return ChunkLimits()


def parse_range(value: str | None, own: int) -> int | None:
    """The next offset from a ``Range`` header (``0-<end>``, optional ``bytes=``), or None.

    ``0-0`` means either nothing or one byte received; ``own`` (our acknowledged count)
    decides, as the protocol notes recommend.
    """
    if not value:
        return None
    text = value.strip()
    for prefix in ("bytes=", "bytes "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    start, sep, end = text.partition("-")
    try:
        first, last = int(start), int(end)
    except ValueError:
        return None
    if not sep or first != 0:
        return None
    if last < 0:
        return 0
    if last == 0:
        return 0 if own == 0 else 1
    return last + 1


def _push_scopes(repository: str) -> tuple[str, ...]:
    """The token scopes every upload request needs."""
    return (repository_scope(repository, "pull", "push"),)


@dataclass
class ChunkSizer:
    """The size of each next chunk of one upload session.

    Fixed when a chunk size is configured (``adaptive`` False); otherwise :meth:`observe`
    sets each next chunk from the throughput of the last one, within ``[low, cap]``.
    ``floor`` is the smallest chunk the registry takes (a 413 halves down to it).
    """

    chunk: int
    cap: int
    floor: int = 1
    low: int = 1
    adaptive: bool = False

    def observe(self, sent: int, seconds: float) -> None:
        """A chunk of ``sent`` bytes was acknowledged ``seconds`` after it was started."""
        if not self.adaptive or sent < self.chunk:
            return  # a short (last) chunk says little about the link
        target = 2 * self.chunk
        if seconds > 0:
            target = min(target, int(sent / seconds * ADAPTIVE_SECONDS))
        target -= target % READ_SIZE
        self.chunk = min(self.cap, max(self.low, target))

    def limit_to(self, limit: int) -> bool:
        """Keep this and later chunks within ``limit`` (a 413 taught it); False at the floor."""
        if self.chunk <= self.floor:
            return False
        self.chunk = self.cap = max(self.floor, min(self.chunk, limit))
        self.low = min(self.low, self.chunk)
        return True


def chunk_sizer(
    size: int, configured: int | None, limits: ChunkLimits, announced_min: int = 0
) -> ChunkSizer:
    """The chunk sizes for a blob of ``size`` bytes: ``configured``, or adaptive when None.

    Registry bounds apply to both: at least the registry's (or announced) minimum and enough
    to stay under ``MAX_PARTS`` parts; at most the registry's maximum, which wins.
    """
    minimum = max(limits.minimum, announced_min, -(-size // MAX_PARTS), 1)
    maximum = limits.maximum

    def bounded(value: int) -> int:
        value = max(value, minimum)
        return max(1, value if maximum is None else min(value, maximum))

    floor = bounded(max(limits.minimum, announced_min, 256 << 10))
    if configured is not None:
        chunk = bounded(configured)
        return ChunkSizer(chunk=chunk, cap=chunk, floor=min(floor, chunk))
    cap = bounded(min(ADAPTIVE_MAX, -(-size // ADAPTIVE_PARTS)))
    low = min(bounded(ADAPTIVE_MIN), cap)
    start = min(bounded(ADAPTIVE_START), cap)
    return ChunkSizer(chunk=start, cap=cap, floor=min(floor, start), low=low, adaptive=True)


class _SessionSignal(Exception):
    """Internal control flow around an upload session, carrying the error that caused it."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(str(error))
        self.error = error


class _RestartSession(_SessionSignal):
    """The upload session is unusable (gone, out of sync): start a new one."""


class _Body:
    """A re-creatable request body over ``[start, end)`` of the blob, hashing as it streams."""

    def __init__(
        self, transfer: _Transfer, start: int, end: int, hasher: Any, verify_at_end: bool
    ) -> None:
        self._transfer = transfer
        self._start = start
        self._end = end
        self._base = hasher
        self._verify = verify_at_end
        self.hasher = hasher.copy()

    def __call__(self) -> Iterator[bytes]:
        self.hasher = self._base.copy()
        return self._stream()

    def _stream(self) -> Iterator[bytes]:
        t = self._transfer
        pos = self._start
        while pos < self._end:
            data = t.read(pos, min(READ_SIZE, self._end - pos))
            self.hasher.update(data)
            pos += len(data)
            if self._verify and pos == self._end:
                t.verify(self.hasher)
            t.sent += len(data)
            t.report(pos)
            yield data


class _Transfer:
    """State of one blob upload: the open file, counters, and the verification rule."""

    def __init__(self, source: BlobSource, fd: int, progress: Callable[[int], None] | None) -> None:
        self.source = source
        self.descriptor = source.descriptor
        self.size = source.descriptor.size
        self.algorithm, _, self.expected = source.descriptor.digest.partition(":")
        self._fd = fd
        self._progress = progress
        self.sent = 0

    def new_hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def read(self, pos: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, self.source.offset + pos)
        except OSError as exc:
            raise ContainerdError(f"{self.source.path}: {exc.strerror}") from exc
        if not data:
            raise BlobCorruptError(
                f"blob {self.descriptor.digest} is truncated: {pos} of {self.size} bytes"
            )
        return data

    def hasher_at(self, target: int, base_offset: int, base: Any) -> Any:
        """The hash state after ``target`` bytes, from a snapshot at ``base_offset`` if usable."""
        if target >= base_offset:
            hasher, pos = base.copy(), base_offset
        else:
            hasher, pos = self.new_hasher(), 0
        while pos < target:
            data = self.read(pos, min(READ_SIZE, target - pos))
            hasher.update(data)
            pos += len(data)
        return hasher

    def verify(self, hasher: Any) -> None:
        actual = hasher.hexdigest()
        if actual != self.expected:
            raise BlobCorruptError(
                f"blob {self.descriptor.digest} is corrupt: its content hashes to "
                f"{self.algorithm}:{actual}; nothing was pushed under its digest"
            )

    def report(self, position: int) -> None:
        if self._progress is not None:
            self._progress(position)


class SessionStore(Protocol):
    """Where chunked upload sessions are remembered, so a restarted daemon can resume them."""

    def load(self, repository: str, digest: str) -> tuple[str, int] | None:
        """The saved (Location, acknowledged offset) for this blob, if any."""

    def save(self, repository: str, digest: str, location: str, offset: int) -> None:
        """Remember the newest Location and acknowledged offset."""

    def drop(self, repository: str, digest: str) -> None:
        """Forget the session (finished or unusable)."""


def _open_blob(source: BlobSource) -> int:
    """A read-only descriptor of the blob's file; a missing file names the blob."""
    try:
        return os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ContainerdError(
            f"blob {source.descriptor.digest}: {source.path} is missing"
        ) from None
    except OSError as exc:
        raise ContainerdError(f"{source.path}: {exc.strerror}") from exc


class BlobUploader:
    """Uploads blobs to one registry with bounded memory; safe to share between threads.

    ``chunk_size`` None (the default) means adaptive chunks (:func:`chunk_sizer`) and one PUT
    for blobs up to ``MONOLITHIC_MAX``; a configured size is used as it is, and blobs up to it
    go in one PUT. ``sessions`` persists chunked sessions across restarts; ``should_stop`` is
    polled between chunks so a stopping daemon leaves a resumable session instead of a
    half-sent chunk; ``clock`` times chunks for the adaptive size; ``on_resume`` is called
    each time a chunked upload continues from the registry's offset. ``body_limit`` is the
    registry's learned request-body limit (HTTP 413): no request body goes over it, and a
    413 lowers it and sends the same bytes again in smaller requests.
    """

    def __init__(
        self,
        client: RegistryClient,
        *,
        chunk_size: int | None = None,
        monolithic_max: int | None = None,
        sessions: SessionStore | None = None,
        should_stop: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_resume: Callable[[], None] = lambda: None,
        body_limit: BodyLimit | None = None,
    ) -> None:
        self.client = client
        self.body_limit = body_limit or BodyLimit(client.host)
        self.on_resume = on_resume
        self.sessions = sessions
        self._should_stop = should_stop or (lambda: False)
        self.clock = clock
        self._limits = registry_limits(client.host)
        self._chunk_size = chunk_size
        if monolithic_max is None:
            monolithic_max = MONOLITHIC_MAX if chunk_size is None else chunk_size
        self._monolithic_max = monolithic_max

    def upload(
        self,
        repository: str,
        source: BlobSource,
        mount_from: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> UploadResult:
        """Make the blob exist in ``repository``: skip, mount, or upload it.

        Request budget per blob and call, with R the retrier's attempts (``retry_attempts``,
        5): each request, or each chunk (a PATCH, after a failure preceded by GET status), is
        tried at most R times, by the retrier alone; a temporary error that outlasts them ends
        the call (the caller's backoff, or the registry's health, decides when to come back).
        A new upload session, at most ``SESSION_ATTEMPTS`` (3) in all, is started only when
        the registry refuses the session itself (400, 404, 416: ``SESSION_REFUSED``), each
        refusal followed by one HEAD (did the blob land anyway?). So: HEAD R; each mount
        source R POSTs (an unavailable registry ends the call rather than trying the next);
        then per session one POST, and one PUT, one PATCH and the closing PUT, or each chunk
        and the closing PUT, each R at most (a 413 sends the same bytes again in smaller
        requests, see ``body_limit``). A registry answering 503 to every PUT gets one POST
        and R PUTs; one refusing every session gets 3 POSTs, 3 PUTs and 4 HEADs.
        """
        desc = source.descriptor
        if self.client.blob_exists(repository, desc):
            return UploadResult(desc.digest, Outcome.EXISTS, 0)
        started = self._mount(repository, desc.digest, mount_from)
        if started is not None and started.status_code == 201:
            return UploadResult(desc.digest, Outcome.MOUNTED, 0)
        resume = None if started is not None else self._saved_session(repository, desc)
        fd = _open_blob(source)
        try:
            transfer = _Transfer(source, fd, progress)
            result = self._upload(repository, transfer, started, resume)
        finally:
            os.close(fd)
        sessions = self._sessions_for(desc.size)
        if sessions is not None:
            sessions.drop(repository, desc.digest)
        return result

    def _mount(
        self, repository: str, digest: str, mount_from: Sequence[str]
    ) -> httpx.Response | None:
        """The answer to the first mount that did not fail (201 mounted, 202 a new session)."""
        for origin in [r for r in mount_from if r != repository][:MAX_MOUNT_SOURCES]:
            try:
                return self.client.upload_start(repository, mount=digest, source=origin)
            except RegistryError as exc:
                if exc.is_unavailable():
                    raise  # the registry, not the mount: another source would fail the same
                log.info(
                    "%s: mount of %s from %s failed (%s)", self.client.host, digest, origin, exc
                )
        return None

    def _saved_session(self, repository: str, desc: Descriptor) -> httpx.URL | None:
        """The Location of a chunked session saved for this blob by an earlier run, if any."""
        sessions = self._sessions_for(desc.size)
        saved = None if sessions is None else sessions.load(repository, desc.digest)
        if saved is None:
            return None
        log.info(
            "%s: resuming upload of %s (saved at %d bytes)",
            self.client.host,
            desc.digest,
            saved[1],
        )
        return self.client.url("/").join(saved[0])

    def _sessions_for(self, size: int) -> SessionStore | None:
        """Where a blob of ``size`` bytes keeps its session: nowhere if it goes in one PUT."""
        return None if self.sessions is None or self._whole(size) else self.sessions

    def _whole(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes goes in one PUT."""
        return size <= self._monolithic_max and self.body_limit.fits(size)

    def _upload(
        self,
        repository: str,
        transfer: _Transfer,
        started: httpx.Response | None,
        resume: httpx.URL | None,
    ) -> UploadResult:
        client = self.client
        desc = transfer.descriptor
        # Artifact Registry takes no PATCH at all, not even a single streamed one (skopeo
        # #1101): registries that refuse chunks get the whole blob in one PUT.
        whole = not self._limits.chunked
        last: RegistryError | None = None
        for _ in range(SESSION_ATTEMPTS):
            response, location = self._session(repository, started, resume)
            resuming = resume is not None
            started = resume = None
            try:
                if self._whole(transfer.size) or whole:
                    too_large = self._put_whole(repository, transfer, location, chunks=not whole)
                    if too_large is not None:
                        # Refused before the body was read: the session is still empty.
                        started, last = response, too_large
                        continue
                else:
                    refused = self._send_chunks(repository, transfer, location, response, resuming)
                    if refused is not None:
                        whole, last = True, refused
                        continue
                return UploadResult(desc.digest, Outcome.UPLOADED, transfer.sent)
            except _RestartSession as restart:
                last = restart.error
                landed = self._restarted(repository, transfer, last)
                if landed is not None:
                    return landed
            except BlobCorruptError:
                client.upload_cancel(repository, location)
                raise
        assert last is not None
        raise RegistryError(
            f"{client.host}: giving up on {desc.digest} after {SESSION_ATTEMPTS} upload "
            f"sessions: {last}",
            status=last.status,
            codes=last.codes,
        )

    def _session(
        self, repository: str, started: httpx.Response | None, resume: httpx.URL | None
    ) -> tuple[httpx.Response | None, httpx.URL]:
        """The POST answer (None for a saved session) and Location of the session to send into."""
        if resume is not None:
            return None, resume
        response = started or self.client.upload_start(repository)
        return response, self.client.session_url(response)

    def _put_whole(
        self, repository: str, transfer: _Transfer, location: httpx.URL, *, chunks: bool
    ) -> RegistryError | None:
        """Send the blob in one PUT; the 413 that taught a lower body limit, if one did.

        Raises on any other error, and on a 413 when the registry takes no chunks either.
        """
        try:
            self._monolithic(repository, transfer, location)
        except RegistryError as exc:
            if exc.status != 413:
                raise
            if not chunks:
                raise RegistryError(
                    f"{exc}: this registry takes no chunked uploads, so a blob of "
                    f"{human_size(transfer.size)} needs a body limit at least that large",
                    status=413,
                ) from None
            self.body_limit.refused(transfer.size, exc)
            return exc
        return None

    def _send_chunks(
        self,
        repository: str,
        transfer: _Transfer,
        location: httpx.URL,
        start: httpx.Response | None,
        resuming: bool,
    ) -> RegistryError | None:
        """Send the blob in chunks; the refusal of the first one, if it says to send it whole."""
        try:
            self._chunked(repository, transfer, location, start, resuming)
        except _FallBackToWhole as fallback:
            log.info(
                "%s: chunked upload refused (%s); sending the blob in one PUT",
                self.client.host,
                fallback.error,
            )
            return fallback.error
        return None

    def _restarted(
        self, repository: str, transfer: _Transfer, error: RegistryError
    ) -> UploadResult | None:
        """After the registry refused the session: the result if the blob landed anyway."""
        desc = transfer.descriptor
        if self.sessions is not None:
            self.sessions.drop(repository, desc.digest)
        log.warning("%s: upload of %s restarts: %s", self.client.host, desc.digest, error)
        if not self.client.blob_exists(repository, desc):
            return None
        outcome = Outcome.UPLOADED if transfer.sent else Outcome.EXISTS
        return UploadResult(desc.digest, outcome, transfer.sent)

    def _close(self, repository: str, transfer: _Transfer, location: httpx.URL) -> None:
        url = location.copy_merge_params({"digest": transfer.descriptor.digest})
        try:
            self.client.send(
                "PUT",
                url,
                scopes=_push_scopes(repository),
                ok={201, 204},
                headers={"Content-Length": "0", "Content-Type": OCTET_STREAM},
                body=b"",
                what=f"PUT upload of {transfer.descriptor.digest}",
                retry=True,
            )
        except RegistryError as exc:
            if exc.status in SESSION_REFUSED:
                raise _RestartSession(exc) from None
            raise

    def _monolithic(self, repository: str, transfer: _Transfer, location: httpx.URL) -> None:
        """One PUT with the whole body; corruption aborts the body before its last byte."""
        body = _Body(transfer, 0, transfer.size, transfer.new_hasher(), verify_at_end=True)
        if transfer.size == 0:
            transfer.verify(body.hasher)
        url = location.copy_merge_params({"digest": transfer.descriptor.digest})
        self._send_whole(repository, "PUT", url, transfer, body, ok={201, 204})

    def _send_whole(
        self,
        repository: str,
        method: str,
        url: httpx.URL,
        transfer: _Transfer,
        body: _Body,
        *,
        ok: Collection[int],
    ) -> httpx.Response:
        """Send the whole blob in one request; a session it broke is restarted by the caller.

        Only a refusal of the session itself (400, 404, 416) calls for a new one: a temporary
        error the retrier already gave up on ends the attempt, as it would on any request.
        """
        try:
            return self.client.send(
                method,
                url,
                scopes=_push_scopes(repository),
                ok=ok,
                headers={"Content-Length": str(transfer.size), "Content-Type": OCTET_STREAM},
                body=body,
                what=f"{method} {transfer.descriptor.digest}",
                retry=True,
            )
        except RegistryError as exc:
            if exc.status in SESSION_REFUSED:
                raise _RestartSession(exc) from None
            raise

    def _sizer_for(self, transfer: _Transfer, response: httpx.Response | None) -> ChunkSizer:
        headers = response.headers if response is not None else {}
        announced = headers.get("oci-chunk-min-length", "")
        limits = self._limits
        learned = self.body_limit.limit
        if learned is not None:
            maximum = learned if limits.maximum is None else min(limits.maximum, learned)
            limits = ChunkLimits(limits.minimum, maximum, limits.chunked)
        return chunk_sizer(
            transfer.size,
            self._chunk_size,
            limits,
            int(announced) if announced.isdigit() else 0,
        )

    def _chunked(
        self,
        repository: str,
        transfer: _Transfer,
        location: httpx.URL,
        start: httpx.Response | None,
        resuming: bool = False,
    ) -> None:
        client = self.client
        session = _ChunkSession(
            self, repository, transfer, location, self._sizer_for(transfer, start)
        )
        # A saved session starts by asking the registry where it stands.
        session.resync = resuming
        range_errors = 0
        first = not resuming
        while session.acked < transfer.size:
            if self._should_stop():
                raise PushInterrupted(
                    f"upload of {transfer.descriptor.digest} paused at {session.acked} bytes"
                )
            try:
                client.retrier.call(
                    f"{client.host}: upload {transfer.descriptor.digest}", session.next_chunk
                )
            except RegistryError as exc:
                if exc.status == 416:
                    range_errors += 1
                self._chunk_failed(exc, session, first=first, range_errors=range_errors)
                continue
            first = False
            transfer.report(session.acked)
            if self.sessions is not None:
                self.sessions.save(
                    repository, transfer.descriptor.digest, str(session.location), session.acked
                )
        transfer.verify(session.snapshot)
        self._close(repository, transfer, session.location)

    def _chunk_failed(
        self, exc: RegistryError, session: _ChunkSession, *, first: bool, range_errors: int
    ) -> None:
        """Return when the chunk is worth sending again; otherwise raise what ends the session.

        Called only after a failure: a chunk that goes through pays nothing for it.
        """
        if exc.status == 413:
            limit = self.body_limit.refused(session.sent_size, exc)
            if session.sizer.limit_to(limit):
                return
            raise RegistryError(
                f"{exc}: chunks of {human_size(session.sizer.chunk)} are the smallest "
                f"this registry takes, and bodies over {human_size(limit)} are refused",
                status=413,
            ) from None
        if exc.status == 416 and range_errors <= 2:
            return
        if exc.status in (404, 416):
            raise _RestartSession(exc) from None
        if first and not exc.is_temporary() and exc.status not in (401, 403):
            raise _FallBackToWhole(exc) from None
        raise exc

    def status(self, repository: str, location: httpx.URL, own: int) -> tuple[httpx.URL, int]:
        """Where the registry says the session stands (GET status), or our own count."""
        try:
            response = self.client.send(
                "GET",
                location,
                scopes=_push_scopes(repository),
                ok={200, 204},
                what="GET upload status",
            )
        except RegistryError as exc:
            if exc.status == 404:
                raise _RestartSession(exc) from None
            if exc.is_temporary():
                raise
            log.info(
                "%s: upload status unavailable (%s); resuming at %d", self.client.host, exc, own
            )
            return location, own
        here = self.client.session_url(response) if response.headers.get("location") else location
        offset = parse_range(response.headers.get("range"), own)
        return here, own if offset is None else offset


class _FallBackToWhole(_SessionSignal):
    """The registry refused the first chunk in a way that says it does not take chunks."""


class _ChunkSession:
    """One chunked upload session: newest Location, acknowledged offset, hash state there.

    :meth:`next_chunk` is the unit of work the retry policy repeats.
    """

    def __init__(
        self,
        uploader: BlobUploader,
        repository: str,
        transfer: _Transfer,
        location: httpx.URL,
        sizer: ChunkSizer,
    ) -> None:
        self._uploader = uploader
        self._client = uploader.client
        self._repository = repository
        self._transfer = transfer
        self.location = location
        self.sizer = sizer
        self.acked = 0
        self.snapshot = transfer.new_hasher()
        self.resync = False
        self.sent_size = 0  # the body size of the last chunk sent
        # Quay's GET status says one byte more than it holds (it renders byte_count + 1 as an
        # inclusive end, quay/quay endpoints/v2/blob.py): a 416 right after resuming past our
        # own count at the offset status gave teaches that skew, once, for this session.
        self.status_skew = 0
        self.ahead: tuple[int, Any] | None = None  # (offset, hash state) before such a resume

    def resume(self) -> None:
        """Continue where the registry says the session stands: the one place a resume happens.

        Bytes the registry kept beyond our acknowledged offset are hashed from the local file,
        not sent again; a session it can no longer continue raises :class:`_RestartSession`.
        """
        transfer = self._transfer
        acked = self.acked
        self.location, offset = self._uploader.status(self._repository, self.location, acked)
        if offset > acked:
            offset = max(acked, offset - self.status_skew)
        self.ahead = (acked, self.snapshot) if offset > acked else None
        if offset > transfer.size:
            raise _RestartSession(
                RegistryError(
                    f"{self._client.host}: upload session of {transfer.descriptor.digest} "
                    f"reports {offset} bytes, more than the blob's {transfer.size}"
                )
            )
        self.snapshot = transfer.hasher_at(offset, acked, self.snapshot)
        self.acked = offset
        self.resync = False
        self._uploader.on_resume()
        log.info(
            "%s: upload of %s resumes at %d bytes (acknowledged %d)",
            self._client.host,
            transfer.descriptor.digest,
            offset,
            acked,
        )

    def next_chunk(self) -> None:
        """Send the next chunk, first asking the registry where it stands after a failure."""
        transfer = self._transfer
        if self.resync:
            self.resume()
            if self.acked >= transfer.size:
                return  # the registry kept everything: only the closing PUT is left
        offset, hasher = self.acked, self.snapshot
        end = min(offset + self.sizer.chunk, transfer.size)
        self.sent_size = end - offset
        body = _Body(transfer, offset, end, hasher, verify_at_end=False)
        started = self._uploader.clock()
        try:
            response = self._client.send(
                "PATCH",
                self.location,
                scopes=_push_scopes(self._repository),
                ok={201, 202, 204},
                headers={
                    "Content-Type": OCTET_STREAM,
                    "Content-Range": f"{offset}-{end - 1}",
                    "Content-Length": str(end - offset),
                },
                body=body,
                what=f"PATCH {transfer.descriptor.digest} [{offset}-{end - 1}]",
            )
        except RegistryError as exc:
            if exc.status == 416 and self.ahead is not None:
                self.status_skew = 1
                self.acked, self.snapshot = self.ahead
            self.ahead = None
            self.resync = True
            raise
        self.ahead = None
        self.sizer.observe(end - offset, self._uploader.clock() - started)
        if response.headers.get("location"):
            self.location = self._client.session_url(response)
        reported = parse_range(response.headers.get("range"), offset)
        if reported is None or reported == end or reported <= offset or reported > transfer.size:
            # Missing, or going backwards: trust our own acknowledged count.
            self.acked, self.snapshot = end, body.hasher
        else:
            self.acked = reported
            self.snapshot = transfer.hasher_at(reported, offset, hasher)
