"""The ``imagepushd`` command line: argparse subcommands, one-line errors, exit codes.

Exit codes: 0 success, 1 failure, 2 usage or configuration error. Errors are one line on
stderr; the traceback is logged only at ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from imagepushd import __version__
from imagepushd.assembly import Daemon
from imagepushd.config import Config, config_path, load_config
from imagepushd.decide.platforms import PlatformPolicy, host_platform
from imagepushd.decide.rules import push_target
from imagepushd.decisions import preview
from imagepushd.errors import (
    ConfigError,
    ImageNotFoundError,
    ImagepushdError,
    InvalidReferenceError,
    NamespaceNotFoundError,
    RootNotFoundError,
    UsageError,
)
from imagepushd.layout import ExportImage, export_layout
from imagepushd.logs import configure_logging
from imagepushd.notify import Notifier
from imagepushd.oci import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Descriptor
from imagepushd.push.archive import ArchiveStore
from imagepushd.push.clients import Connection, RegistryClients
from imagepushd.push.progress import ProgressRenderer
from imagepushd.push.publish import Image, Published, Publisher, Referrers
from imagepushd.push.registry import login as registry_login
from imagepushd.push.registry.client import HostSettings
from imagepushd.push.registry.credentials import Credentials, CredentialSource, CredentialStore
from imagepushd.reference import parse_reference
from imagepushd.remember import OPEN_STATUSES, JobRecord, Pushed, RegistryStatus, State, Summary
from imagepushd.units import human_size, parse_size
from imagepushd.watch.content import ContentStore, ImageGraph
from imagepushd.watch.metadata import ImageRecord, MetadataSnapshot, MetadataStore
from imagepushd.watch.referrers import Referrer, ReferrerFinder
from imagepushd.watch.roots import Found, discover_root

log = logging.getLogger("imagepushd")

_SHORT_TYPES = {
    OCI_INDEX: "oci index",
    OCI_MANIFEST: "oci manifest",
    DOCKER_LIST: "docker list",
    DOCKER_MANIFEST: "docker manifest",
}


@dataclass(frozen=True)
class Context:
    """What a command may touch of the outside world (injected, so tests need no patching)."""

    env: Mapping[str, str]
    home: Path
    stdout: TextIO
    stderr: TextIO = sys.stderr
    stdin: TextIO = sys.stdin
    fs: Path = Path("/")  # the file system root containerd's roots are looked for under


class _Store:
    """containerd's metadata and content for one command, opened from the discovered root."""

    def __init__(self, args: argparse.Namespace, ctx: Context) -> None:
        configured = None
        if args.root is None:
            configured = _config(args, ctx, missing_ok=True).containerd.root
        self.found: Found = discover_root(args.root, configured, ctx.env, ctx.home, ctx.fs)
        self.metadata = MetadataStore.at_root(self.found.path)
        self.content = ContentStore(self.found.path)

    def snapshot(self, namespace: str | None) -> MetadataSnapshot:
        snap = self.metadata.read(None if namespace is None else [namespace], blobs=True)
        if namespace is not None and namespace not in snap.namespaces:
            have = ", ".join(snap.namespaces) or "none"
            raise NamespaceNotFoundError(
                f"namespace {namespace!r} does not exist in {self.metadata.path} (have: {have})"
            )
        return snap


def _namespace(args: argparse.Namespace, ctx: Context) -> str | None:
    if getattr(args, "all_namespaces", False):
        return None
    return str(args.namespace or ctx.env.get("CONTAINERD_NAMESPACE") or "default")


class _TargetRow:
    """The listing fields every image with one target in one namespace shares (computed once).

    ``json_head`` and ``json`` hold them already encoded (``{"namespace": ..., "name": `` and
    ``"digest": ..., "missing": [...]``), ``json_error`` the ``, "error": ...`` of a failed walk:
    a row's JSON only adds its name and times.
    """

    __slots__ = (
        "attestations",
        "complete",
        "digest",
        "error",
        "json",
        "json_error",
        "json_head",
        "media_type",
        "missing",
        "platforms",
        "size",
    )

    def __init__(
        self, namespace: str, target: Descriptor, graph: ImageGraph | None, error: str | None
    ) -> None:
        self.digest = target.digest
        self.media_type = target.media_type
        self.size = graph.size if graph else target.size
        self.platforms = [str(p) for p in graph.platforms()] if graph else []
        self.attestations = len(graph.attestations()) if graph else 0
        self.complete = bool(graph and graph.complete)
        self.missing = [d.digest for d in graph.missing] if graph else []
        self.error = error
        shared = {
            "digest": self.digest,
            "media_type": self.media_type,
            "size": self.size,
            "platforms": self.platforms,
            "attestations": self.attestations,
            "complete": self.complete,
            "missing": self.missing,
        }
        self.json_head = f'{{"namespace": {json.dumps(namespace)}, "name": '
        self.json = json.dumps(shared)[1:-1]
        self.json_error = "" if error is None else ", " + json.dumps({"error": error})[1:-1]


def _image_row(record: ImageRecord, shared: _TargetRow) -> dict[str, Any]:
    """One listing row as a dict (the JSON output is :func:`_image_json` of the same row)."""
    row: dict[str, Any] = {
        "namespace": record.namespace,
        "name": record.name,
        "digest": shared.digest,
        "media_type": shared.media_type,
        "size": shared.size,
        "platforms": list(shared.platforms),
        "attestations": shared.attestations,
        "complete": shared.complete,
        "missing": list(shared.missing),
        "created": record.created_at.isoformat() if record.created_at else None,
        "updated": record.updated_at.isoformat() if record.updated_at else None,
    }
    if shared.error is not None:
        row["error"] = shared.error
    return row


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for str (C)


def _image_json(record: ImageRecord, shared: _TargetRow) -> str:
    """``json.dumps(_image_row(record, shared))``, without building the dict.

    ``shared`` must be the row of ``record``'s namespace and target. ``isoformat()`` is plain
    ASCII without quotes or backslashes: it needs no escaping.
    """
    created, updated = record.created_at, record.updated_at
    created_json = f'"{created.isoformat()}"' if created else "null"
    if updated is created:
        updated_json = created_json  # containerd sets both at once: one datetime
    else:
        updated_json = f'"{updated.isoformat()}"' if updated else "null"
    return (
        f"{shared.json_head}{_encode_str(record.name)}, {shared.json}, "
        f'"created": {created_json}, "updated": {updated_json}{shared.json_error}}}'
    )


def _target_row(store: _Store, snap: MetadataSnapshot, record: ImageRecord) -> _TargetRow:
    """The shared row of ``record``'s target; a failed walk is logged and kept as its error."""
    graph: ImageGraph | None = None
    error: str | None = None
    try:
        graph = store.content.walk(record.target, snap.blobs.get(record.namespace, {}))
    except ImagepushdError as exc:
        log.warning("%s/%s: %s", record.namespace, record.name, exc)
        error = str(exc)
    return _TargetRow(record.namespace, record.target, graph, error)


def _listing(store: _Store, snap: MetadataSnapshot) -> list[tuple[ImageRecord, _TargetRow]]:
    """Every image of ``snap`` with the row of its target."""
    # Thousands of tags share a few targets: their graph and derived fields are computed once.
    shared: dict[tuple[str, str, str, int], _TargetRow] = {}
    listing: list[tuple[ImageRecord, _TargetRow]] = []
    for record in snap.images:
        target = record.target
        key = (record.namespace, target.digest, target.media_type, target.size)
        row = shared.get(key)
        if row is None:
            row = shared[key] = _target_row(store, snap, record)
        listing.append((record, row))
    return listing


def _images_json(out: TextIO, listing: list[tuple[ImageRecord, _TargetRow]]) -> None:
    # One object per line, encoded by the C encoder (indent=2 uses the pure-Python one).
    if listing:
        lines = ",\n  ".join([_image_json(record, row) for record, row in listing])
        out.write(f"[\n  {lines}\n]\n")
    else:
        out.write("[]\n")


def _content_cell(row: _TargetRow) -> str:
    """The CONTENT column: complete, error (the walk failed) or how many blobs are missing."""
    if row.missing:
        return f"missing {len(row.missing)}"
    return "error" if row.error is not None else "complete"


def _image_cells(record: ImageRecord, row: _TargetRow) -> tuple[str, ...]:
    return (
        record.namespace,
        record.name,
        row.digest,
        _SHORT_TYPES.get(row.media_type, row.media_type),
        human_size(row.size),
        ",".join(row.platforms) or "-",
        _content_cell(row),
    )


def _images_table(out: TextIO, listing: list[tuple[ImageRecord, _TargetRow]]) -> None:
    """The listing as columns padded to their widest cell (the last one is not padded)."""
    table = [
        ("NAMESPACE", "NAME", "DIGEST", "TYPE", "SIZE", "PLATFORMS", "CONTENT"),
        *(_image_cells(record, row) for record, row in listing),
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)]
        out.write("  ".join([*cells, r[-1]]) + "\n")


def cmd_images(args: argparse.Namespace, ctx: Context) -> int:
    """List images with their content status."""
    store = _Store(args, ctx)
    if args.root is None:
        ctx.stderr.write(f"imagepushd: {store.found.describe()}\n")
    namespace = _namespace(args, ctx)
    listing = _listing(store, store.snapshot(namespace))
    if args.json:
        _images_json(ctx.stdout, listing)
    else:
        _images_table(ctx.stdout, listing)
    return 0


def cmd_export(args: argparse.Namespace, ctx: Context) -> int:
    """Write images as an OCI image layout (directory or tar)."""
    store = _Store(args, ctx)
    namespace = _namespace(args, ctx)
    assert namespace is not None
    snap = store.snapshot(namespace)
    known = snap.blobs.get(namespace, {})
    images: list[ExportImage] = []
    for name in dict.fromkeys(args.images):
        record = snap.image(namespace, name)
        if record is None:
            raise ImageNotFoundError(f"image {name!r} not found in namespace {namespace!r}")
        images.append(ExportImage(name, record.target, store.content.walk(record.target, known)))
    result = export_layout(store.content, images, args.output, host_platform())
    log.info(
        "exported %d image(s), %d blobs, %s to %s",
        result.images,
        result.blobs,
        human_size(result.bytes),
        result.path,
    )
    return 0


def _find_image(snap: MetadataSnapshot, namespace: str, name: str) -> ImageRecord:
    """The image called ``name`` exactly, else by its normalised reference."""
    record = snap.image(namespace, name)
    if record is None:
        try:
            record = snap.image(namespace, str(parse_reference(name)))
        except InvalidReferenceError:
            record = None
    if record is None:
        raise ImageNotFoundError(f"image {name!r} not found in namespace {namespace!r}")
    return record


def _credentials(args: argparse.Namespace, ctx: Context, host: str) -> CredentialSource:
    """``--password-stdin``'s credentials, or the stored ones (read again if rejected)."""
    if args.password_stdin:
        if not args.username:
            raise UsageError("--password-stdin needs --username")
        password = ctx.stdin.readline().removesuffix("\n").removesuffix("\r")
        return CredentialSource.fixed(Credentials(username=args.username, password=password))
    if args.username:
        raise UsageError("--username needs --password-stdin (passwords never go in argv)")
    store = CredentialStore(ctx.env, ctx.home)
    return CredentialSource(lambda: store.lookup(host))


def cmd_push(args: argparse.Namespace, ctx: Context) -> int:
    """Push one image from containerd's content store (or an archive) to a registry."""
    policy = PlatformPolicy.parse(args.platform)
    if args.archive is not None:
        if args.referrers:
            raise UsageError("--referrers reads them from containerd; not with --archive")
        return _push_archive(args, ctx, policy)
    store = _Store(args, ctx)
    namespace = _namespace(args, ctx)
    assert namespace is not None
    snap = store.snapshot(namespace)
    record = _find_image(snap, namespace, args.image)
    target = push_target(args.target, record.name, namespace)
    blobs = snap.blobs.get(namespace, {})
    graph = store.content.walk(record.target, blobs)

    # containerd's distribution.source labels name the host without its port.
    def mount_sources(descriptor: Descriptor) -> list[str]:
        blob = blobs.get(descriptor.digest)
        return blob.sources_on(target.registry) if blob is not None else []

    def find() -> tuple[Sequence[Referrer], Collection[str]]:
        source = parse_reference(record.name, default_tag=None)
        found = ReferrerFinder(store.content).referrers(
            snap, namespace, record.target.digest, source.repository
        )
        return found, blobs

    referrers = Referrers(record.target.digest, store.content, find)
    image = Image(store.content, graph, target, policy, mount_sources)
    return _publish(args, ctx, image, referrers if args.referrers else None)


def _push_archive(args: argparse.Namespace, ctx: Context, policy: PlatformPolicy) -> int:
    """``push --archive FILE [IMAGE] TARGET``: blobs streamed from the archive, not extracted."""
    if args.root is not None or args.namespace is not None:
        raise UsageError("--root and -n read containerd; --archive pushes from the archive")
    # With --archive the positionals are [IMAGE] TARGET: a lone one is the target.
    name, target_text = (args.image, args.target) if args.target else (None, args.image)
    target = parse_reference(target_text)
    archive = ArchiveStore.open(args.archive)
    image = archive.select(name)
    graph = archive.walk(archive.target(image))
    return _publish(args, ctx, Image(archive, graph, target, policy))


def _publish(
    args: argparse.Namespace, ctx: Context, image: Image, referrers: Referrers | None = None
) -> int:
    """Push ``image`` (then ``referrers``) with the command's options and print the result."""
    published = _published(args, ctx, image, referrers)
    result = published.result
    if published.subject_moved:
        assert referrers is not None
        raise ImagepushdError(
            f"--referrers: {image.target} now holds {result.digest} (platform policy "
            f"{image.policy}), not {referrers.subject}, which the referrers refer to"
        )
    if args.json:
        _print_published_json(ctx, published)
    else:
        _print_published(ctx, published)
    return 0


def _published(
    args: argparse.Namespace, ctx: Context, image: Image, referrers: Referrers | None
) -> Published:
    """Publish with a client pool and a progress display that live for this one push."""
    connection = Connection(
        settings=HostSettings(plain_http=args.plain_http, ca_file=args.ca_file),
        credentials=_credentials(args, ctx, image.target.registry),
        chunk_size=args.chunk_size,
    )
    renderer = None if args.json else ProgressRenderer(ctx.stderr, ctx.stderr.isatty())
    clients = RegistryClients(lambda host: connection)
    publisher = Publisher(clients, host=host_platform(), on_event=renderer)
    try:
        return publisher.publish(image, concurrency=args.concurrency, referrers=referrers)
    finally:
        if renderer is not None:
            renderer.close()
        clients.close()


def _print_published_json(ctx: Context, published: Published) -> None:
    doc = published.result.to_json()
    if published.referrers is not None:
        doc["referrers"] = published.referrers.to_json()
    json.dump(doc, ctx.stdout, indent=2)
    ctx.stdout.write("\n")


def _print_published(ctx: Context, published: Published) -> None:
    result, extra = published.result, published.referrers
    state = "up to date" if result.up_to_date else "pushed"
    ctx.stdout.write(
        f"{state} {result.target} {result.digest}: {result.pushed_blobs} blobs uploaded, "
        f"{result.mounted_blobs} mounted, {result.skipped_blobs} already there, "
        f"{human_size(result.bytes_sent)} sent\n"
    )
    for pushed in extra.pushed if extra is not None else ():
        state = "up to date" if pushed.result.up_to_date else "pushed"
        ctx.stdout.write(f"{state} referrer {pushed.target} {pushed.result.digest}\n")
    if extra is not None and extra.index is not None:
        ctx.stdout.write(f"updated referrers index {extra.index}\n")


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _config(args: argparse.Namespace, ctx: Context, *, missing_ok: bool = False) -> Config:
    return load_config(config_path(args.config, ctx.env), ctx.env, missing_ok=missing_ok)


def cmd_check_config(args: argparse.Namespace, ctx: Context) -> int:
    """Validate the configuration: every problem on its own line, exit 2 if any."""
    path = config_path(args.config, ctx.env)
    try:
        config = load_config(path, ctx.env)
    except ConfigError as exc:
        ctx.stderr.write(f"{path}: invalid configuration\n")
        for problem in exc.problems:
            ctx.stderr.write(f"  {problem}\n")
        return exc.exit_code
    ctx.stdout.write(
        f"{path}: ok ({len(config.rules)} rule(s), {len(config.registries)} registry "
        f"section(s), state {config.state_path})\n"
    )
    # Not a configuration error: containerd may not have started yet.
    try:
        found = discover_root(None, config.containerd.root, ctx.env, ctx.home, ctx.fs)
    except RootNotFoundError as exc:
        ctx.stdout.write(f"{exc}\n")
    else:
        ctx.stdout.write(f"{found.describe()}\n")
    return 0


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    """The daemon (foreground, for systemd); ``--once``: one pass, then exit."""
    path = config_path(args.config, ctx.env)
    with Notifier.from_env(ctx.env) as notifier:
        daemon = Daemon(path, env=ctx.env, home=ctx.home, notifier=notifier, once=args.once)
        code = daemon.run()
    if daemon.stuck:
        # A push thread hung in a registry request: don't let interpreter exit join it.
        logging.shutdown()
        os._exit(code)
    return code


def cmd_plan(args: argparse.Namespace, ctx: Context) -> int:
    """What the rules match now and what would be pushed, with the reason for each skip."""
    config = _config(args, ctx)
    rows = preview(config, ctx.env, ctx.home)
    if args.json:
        json.dump(rows, ctx.stdout, indent=2)
        ctx.stdout.write("\n")
        return 0
    for row in rows:
        target = f" → {row['target']}" if row["target"] else ""
        ctx.stdout.write(f"{row['action']:<8} {row['namespace']}/{row['name']}{target}")
        ctx.stdout.write(f"  ({row['reason']})\n" if row["reason"] else "\n")
    if not rows:
        ctx.stdout.write("no images\n")
    return 0


def _local_datetime(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _local_time(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


@dataclass(frozen=True)
class _Status:
    """What ``status`` shows, read from the state file in one go."""

    summary: Summary
    pushed: list[Pushed]
    open_jobs: list[JobRecord]
    cancelled: list[JobRecord]


def _status_json(status: _Status) -> dict[str, Any]:
    """``status --json``: the summary, then the recent pushes, open jobs and cancelled jobs."""
    return {
        **status.summary,
        "recent": [
            {
                "target": p.target,
                "digest": p.digest,
                "namespace": p.namespace,
                "name": p.name,
                "pushed_at": p.pushed_at,
                "bytes": p.bytes,
            }
            for p in status.pushed
        ],
        "pending": [
            {
                "id": j.id,
                "status": j.status,
                "namespace": j.namespace,
                "name": j.name,
                "digest": j.digest,
                "target": j.target,
                "attempts": j.attempts,
                "next_attempt": j.next_attempt,
                "last_error": j.last_error,
            }
            for j in status.open_jobs
        ],
        "cancelled": [
            {
                "id": j.id,
                "namespace": j.namespace,
                "name": j.name,
                "digest": j.digest,
                "target": j.target,
                "cancelled_at": j.updated,
                "reason": j.last_error,
            }
            for j in status.cancelled
        ],
    }


def _hold(health: RegistryStatus) -> float | None:
    """The end of the registry's ``Retry-After`` hold, if it is still in force."""
    held = health["held_until"]
    return held if held is not None and held > time.time() else None


def _registry_line(health: RegistryStatus) -> str:
    """A registry's health; its last error only while it matters (held back or down)."""
    since = _local_datetime(health["since"])
    line = f"registry {health['registry']}: " + (
        f"up since {since}" if health["up"] else f"DOWN since {since}"
    )
    held = _hold(health)
    if held is not None:
        line += f", held until {_local_time(held)}"
    if health["waiting"]:
        line += f", {health['waiting']} job(s) waiting"
    if health["last_error"] and (held is not None or not health["up"]):
        line += f": {health['last_error']}"
    return line


def _open_job_line(job: JobRecord) -> str:
    """A queued, running or failed job; a failed one with its next attempt and last error."""
    line = f"{job.status:<8} {job.namespace}/{job.name} → {job.target} (attempts {job.attempts}"
    if job.status == "failed":
        return line + f", next {_local_time(job.next_attempt)}): {job.last_error}"
    return line + ")"


def _totals_line(path: Path, summary: Summary) -> str:
    """The state file, its push count and the job count of each status that has any."""
    counts = ", ".join(f"{n} {s}" for s, n in summary["jobs"].items() if n)
    return f"state {path}: {summary['pushed_count']} pushed, {counts}"


def _status_text(out: TextIO, path: Path, status: _Status) -> None:
    """``status``: totals, each registry, open jobs, cancelled jobs, recent pushes; a line each."""
    out.write(_totals_line(path, status.summary) + "\n")
    for health in status.summary["registries"]:
        out.write(_registry_line(health) + "\n")
    for job in status.open_jobs:
        out.write(_open_job_line(job) + "\n")
    for job in status.cancelled:
        out.write(
            f"cancelled {_local_datetime(job.updated)} {job.namespace}/{job.name} → "
            f"{job.target}: {job.last_error}\n"
        )
    for p in status.pushed:
        out.write(f"pushed   {_local_datetime(p.pushed_at)} {p.target} {p.digest}\n")


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    """Pushed targets, pending and failing jobs, from the state file."""
    config = _config(args, ctx, missing_ok=True)
    if not config.state_path.exists():
        raise ImagepushdError(f"no state file at {config.state_path}: the daemon has not run yet")
    with State(config.state_path) as state:
        status = _Status(
            summary=state.summary(),
            pushed=state.pushed.newest(limit=args.limit),
            open_jobs=state.jobs.select(OPEN_STATUSES),
            cancelled=state.jobs.cancelled(limit=args.limit),
        )
    if args.json:
        json.dump(_status_json(status), ctx.stdout, indent=2, default=str)
        ctx.stdout.write("\n")
    else:
        _status_text(ctx.stdout, config.state_path, status)
    return 0


_PACKAGED_EXEC = "/usr/bin/imagepushd"


def _packaged(name: str) -> str:
    """A file shipped in the package's ``data/`` directory (the unit, the example config)."""
    return resources.files("imagepushd").joinpath("data", name).read_text(encoding="utf-8")


def cmd_print_unit(args: argparse.Namespace, ctx: Context) -> int:
    """Print the systemd unit shipped with the package (``--exec``: another ExecStart path)."""
    unit = _packaged("imagepushd.service")
    if args.exec != _PACKAGED_EXEC:
        unit = unit.replace(f"ExecStart={_PACKAGED_EXEC} ", f"ExecStart={args.exec} ")
    ctx.stdout.write(unit)
    return 0


def cmd_print_config(args: argparse.Namespace, ctx: Context) -> int:
    """Print the example configuration shipped with the package."""
    ctx.stdout.write(_packaged("config.example.toml"))
    return 0


def _login_credentials(args: argparse.Namespace, ctx: Context) -> Credentials:
    """Username and password for ``login``: stdin, or prompts on a terminal; never argv."""
    username = args.username
    if args.password_stdin:
        if not username:
            raise UsageError("--password-stdin needs --username")
        # As docker: all of stdin, less one trailing newline (CRLF too).
        password = ctx.stdin.read().removesuffix("\n").removesuffix("\r")
    else:
        if not ctx.stdin.isatty():
            raise UsageError(
                "no terminal to prompt for the password: pass --username and --password-stdin"
            )
        if not username:
            ctx.stderr.write("Username: ")
            ctx.stderr.flush()
            line = ctx.stdin.readline()
            if not line:
                raise UsageError("no username entered")
            username = line.strip()
        try:
            password = getpass.getpass("Password: ", stream=ctx.stderr)
        except EOFError:
            raise UsageError("no password entered") from None
    if not username:
        raise UsageError("empty username")
    if ":" in username:
        raise UsageError(f"username {username!r}: must not contain ':'")
    if not password:
        raise UsageError("empty password")
    return Credentials(username=username, password=password)


def cmd_login(args: argparse.Namespace, ctx: Context) -> int:
    """Verify credentials against a registry, then store them where docker looks for them."""
    address = registry_login.parse_registry(args.registry)
    credentials = _login_credentials(args, ctx)
    settings = HostSettings(plain_http=args.plain_http or address.plain_http, ca_file=args.ca_file)
    store = CredentialStore(ctx.env, ctx.home)
    result = registry_login.login(address.host, credentials, store, settings=settings)
    if not result.verified:
        ctx.stderr.write(
            f"imagepushd: warning: {result.host} asks for no authentication: "
            "the credentials were stored without being verified\n"
        )
    ctx.stdout.write(
        f"logged in to {result.host} as {result.username} "
        f"(credentials stored in {result.destination})\n"
    )
    return 0


def cmd_logout(args: argparse.Namespace, ctx: Context) -> int:
    """Remove a registry's stored credentials (helper and docker's config.json)."""
    address = registry_login.parse_registry(args.registry)
    removed = registry_login.logout(address.host, CredentialStore(ctx.env, ctx.home))
    if removed:
        ctx.stdout.write(f"logged out of {address.host} (removed from {', '.join(removed)})\n")
    else:
        ctx.stdout.write(f"not logged in to {address.host}: nothing to remove\n")
    return 0


_NAMESPACE_HELP = "containerd namespace (default: $CONTAINERD_NAMESPACE, else default)"


def _add_store_options(parser: argparse.ArgumentParser, all_namespaces: bool) -> None:
    parser.add_argument("--root", type=Path, help="containerd root (default: discovered)")
    if all_namespaces:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("-n", "--namespace", help=_NAMESPACE_HELP)
        group.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    else:
        parser.add_argument("-n", "--namespace", help=_NAMESPACE_HELP)


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """``--config`` and ``--log-level``, on the main parser and again on each subcommand.

    On a subcommand they default to ``SUPPRESS``, so ``imagepushd check-config --config F``
    works as well as ``imagepushd --config F check-config`` and neither hides the other.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        help="configuration file (default: $IMAGEPUSHD_CONFIG or /etc/imagepushd/config.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default,
        help="log verbosity (default: info for run, warning otherwise; debug shows tracebacks)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="imagepushd",
        description="Push images from containerd's content store to OCI registries.",
    )
    parser.add_argument("--version", action="version", version=f"imagepushd {__version__}")
    _add_global_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, parents=[common])

    images = command(
        "images",
        "list images in containerd and their content status",
        "List the images in containerd's metadata: namespace, name, digest, media type, size, "
        "platforms, and whether all of their content is present.",
    )
    _add_store_options(images, all_namespaces=True)
    images.add_argument("--json", action="store_true", help="print a JSON list")
    images.set_defaults(func=cmd_images)

    export = command(
        "export",
        "write images as an OCI image layout",
        "Write images from containerd's content store as an OCI image layout (a directory, or "
        "a tar when OUTPUT ends in .tar) that ctr, skopeo and docker load read.",
    )
    export.add_argument("images", nargs="+", metavar="IMAGE", help="image name in containerd")
    export.add_argument(
        "-o", "--output", type=Path, required=True, help="directory, or a tar if it ends in .tar"
    )
    _add_store_options(export, all_namespaces=False)
    export.set_defaults(func=cmd_export)

    push = command(
        "push",
        "push one image to a registry",
        "Push one image from containerd's content store, or with --archive from a "
        "docker save or OCI image-layout tar (positionals then [IMAGE] TARGET: IMAGE may be "
        "left out when the archive holds one image).",
    )
    push.add_argument(
        "image", metavar="IMAGE", help="image name in containerd (or in the --archive)"
    )
    push.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        help="destination reference (default: IMAGE); a prefix ending in / "
        "(host/proj/: the image's path and tag go under it) or a template with "
        "{image} {registry} {repository} {tag} {namespace}, as a rule's target",
    )
    push.add_argument(
        "--archive",
        type=Path,
        metavar="FILE",
        help="push from this uncompressed docker save / OCI layout tar, read in place",
    )
    _add_store_options(push, all_namespaces=False)
    push.add_argument(
        "--platform",
        default="all",
        help="all | available | host | os/arch[/variant][,...] (default: all)",
    )
    push.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS")
    push.add_argument("--ca-file", type=Path, help="extra CA certificates (PEM) to trust")
    push.add_argument(
        "--chunk-size",
        type=_size,
        default=None,
        help="upload chunk size; blobs up to it go in one PUT (default: adaptive)",
    )
    push.add_argument(
        "--concurrency", type=_positive, default=3, help="blobs in flight (default 3)"
    )
    push.add_argument("--username", help="registry user (with --password-stdin)")
    push.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    push.add_argument(
        "--referrers",
        action="store_true",
        help="also push the image's cosign signatures/attestations and OCI referrers",
    )
    push.add_argument("--json", action="store_true", help="print the result as JSON")
    push.set_defaults(func=cmd_push)

    run_cmd = command(
        "run",
        "the daemon: watch containerd and push (for systemd)",
        "Watch containerd's meta.db and push newly tagged images that match the configured "
        "rules; runs in the foreground, as systemd's Type=notify service.",
    )
    run_cmd.add_argument("--once", action="store_true", help="scan, push what is due, exit")
    run_cmd.set_defaults(func=cmd_run)

    plan = command(
        "plan",
        "what the rules match now and what would be pushed",
        "Show what the configured rules match in containerd now and what the daemon would do "
        "with each image (push, wait, skip) and why, without pushing or writing the state.",
    )
    plan.add_argument("--json", action="store_true", help="print a JSON list")
    plan.set_defaults(func=cmd_plan)

    status = command(
        "status",
        "pushed targets and pending or failing jobs",
        "Read the daemon's state file: recent pushes, queued and failing jobs with their last "
        "error and next attempt, recent cancellations.",
    )
    status.add_argument("--json", action="store_true", help="print a JSON object")
    status.add_argument("--limit", type=_positive, default=20, help="recent pushes to show")
    status.set_defaults(func=cmd_status)

    check = command(
        "check-config",
        "validate the configuration file",
        "Validate the configuration file and report every problem with its key and line; "
        "exit 2 when it is invalid.",
    )
    check.set_defaults(func=cmd_check_config)

    unit = command(
        "print-unit",
        "print the packaged systemd unit",
        "Print the systemd unit shipped with the package (for a pip install).",
    )
    unit.add_argument(
        "--exec",
        default=_PACKAGED_EXEC,
        metavar="PATH",
        help=f"imagepushd executable for ExecStart= (default: {_PACKAGED_EXEC})",
    )
    unit.set_defaults(func=cmd_print_unit)

    example = command(
        "print-config",
        "print the example configuration",
        "Print the example configuration shipped with the package, every key commented.",
    )
    example.set_defaults(func=cmd_print_config)

    login = command(
        "login",
        "verify registry credentials, then store them for docker's tooling",
        "Verify credentials against a registry, then store them where docker and imagepushd "
        "look for them (a credential helper, else docker's config.json).",
    )
    login.add_argument(
        "registry", metavar="REGISTRY", help="host[:port], docker.io, or https://host/"
    )
    login.add_argument("--username", "-u", help="registry user (prompted on a terminal)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS")
    login.add_argument("--ca-file", type=Path, help="extra CA certificates (PEM) to trust")
    login.set_defaults(func=cmd_login)

    logout = command(
        "logout",
        "remove a registry's stored credentials",
        "Remove a registry's stored credentials (credential helper and docker's config.json).",
    )
    logout.add_argument(
        "registry", metavar="REGISTRY", help="host[:port], docker.io, or https://host/"
    )
    logout.set_defaults(func=cmd_logout)
    return parser


def run(argv: Sequence[str], ctx: Context, stderr: TextIO) -> int:
    """Parse ``argv`` and run the command; errors become one line on ``stderr``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("info" if args.command == "run" else "warning")
    configure_logging(level, ctx.env, stderr)
    try:
        return int(args.func(args, ctx))
    except ImagepushdError as exc:
        log.debug("traceback", exc_info=True)
        stderr.write(f"imagepushd: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        stderr.write("imagepushd: interrupted\n")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    ctx = Context(
        env=os.environ, home=Path.home(), stdout=sys.stdout, stderr=sys.stderr, stdin=sys.stdin
    )
    try:
        return run(sys.argv[1:] if argv is None else argv, ctx, sys.stderr)
    except BrokenPipeError:
        # stdout closed early (``| head``): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
