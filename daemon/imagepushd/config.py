"""The TOML configuration → frozen dataclasses, with every problem reported at once.

Each problem names its key path and, where the file shows it, its line, so an operator can fix
the whole file in one go; ``imagepushd check-config`` prints them and exits 2.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from imagepushd.decide.platforms import PlatformPolicy
from imagepushd.decide.rules import Glob, Rule, check_template
from imagepushd.errors import ConfigError, ImagepushdError, UsageError
from imagepushd.listen import Listen, parse_listen
from imagepushd.units import parse_duration, parse_size

DEFAULT_PATH = Path("/etc/imagepushd/config.toml")
DEFAULT_STATE = Path("/var/lib/imagepushd/state.db")
T = TypeVar("T")


@dataclass(frozen=True)
class ContainerdSettings:
    """``[containerd]``."""

    root: Path | None = None
    namespaces: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PushSettings:
    """``[push]``: how pushes run and when images count as due."""

    concurrency: int = 3
    parallel_images: int = 2
    chunk_size: int | None = None  # None: adaptive (registry.upload.chunk_sizer)
    platforms: PlatformPolicy = field(default_factory=PlatformPolicy)
    on_start: str = "new-only"
    settle: float = 1.0
    retry_attempts: int = 5
    retry_initial: float = 0.5
    retry_max: float = 30.0
    job_backoff_initial: float = 30.0
    job_backoff_max: float = 3600.0
    resync_interval: float = 300.0


@dataclass(frozen=True)
class RegistrySettings:
    """``[registries."host"]``."""

    plain_http: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    password_credential: str | None = None
    chunk_size: int | None = None
    concurrency: int | None = None
    # Shared by every job and target of the registry (registry.throttle).
    requests_per_second: float | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: where to serve Prometheus metrics (None: not served)."""

    listen: Listen | None = None


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    containerd: ContainerdSettings = field(default_factory=ContainerdSettings)
    state_path: Path = DEFAULT_STATE
    push: PushSettings = field(default_factory=PushSettings)
    rules: tuple[Rule, ...] = ()
    registries: Mapping[str, RegistrySettings] = field(default_factory=dict)
    source: str = "<defaults>"
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def registry(self, host: str) -> RegistrySettings:
        """Settings for ``host`` (defaults when it has no section)."""
        return self.registries.get(host, RegistrySettings())


def config_path(explicit: Path | None, env: Mapping[str, str]) -> Path:
    """``--config``, else ``$IMAGEPUSHD_CONFIG``, else ``/etc/imagepushd/config.toml``."""
    if explicit is not None:
        return explicit
    if env.get("IMAGEPUSHD_CONFIG"):
        return Path(env["IMAGEPUSHD_CONFIG"])
    return DEFAULT_PATH


def load_config(path: Path, env: Mapping[str, str], *, missing_ok: bool = False) -> Config:
    """Read and validate the file at ``path``; a missing file is an error unless allowed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return Config(state_path=_default_state(env), source=f"{path} (absent: defaults)")
        raise UsageError(f"{path}: no such configuration file (pass --config)") from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["not UTF-8 text"]) from None
    return parse_config(text, str(path), env)


class LiveConfig:
    """The daemon's configuration file as last read successfully; a reload replaces it.

    Worker threads read :attr:`current` at each job and each new registry connection, so a
    reload reaches them without a callback into the loop (one attribute read: atomic).
    """

    def __init__(self, path: Path, env: Mapping[str, str]) -> None:
        self.path = path
        self._env = env
        self.current = load_config(path, env)

    def reload(self) -> Config:
        """Read the file again; on an error (:class:`ImagepushdError`) the current one stays."""
        self.current = load_config(self.path, self._env)
        return self.current


def _default_state(env: Mapping[str, str]) -> Path:
    directory = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(directory) / "state.db" if directory else DEFAULT_STATE


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


def _locate(text: str) -> dict[str, int]:
    """Map key paths (``push.chunk_size``, ``rule[1].match``) to 1-based line numbers."""
    lines: dict[str, int] = {}
    table = ""
    counters: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            name = re.sub(r"\s*\.\s*", ".", header.group(2).strip())
            if header.group(1) == "[[":
                counters[name] = counters.get(name, -1) + 1
                table = f"{name}[{counters[name]}]"
            else:
                table = name
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            name = key.group(1).strip('"')
            lines.setdefault(f"{table}.{name}" if table else name, number)
    return lines


class _Checker:
    """Collects problems while converting the parsed document."""

    def __init__(self, lines: dict[str, int]) -> None:
        self._found: list[tuple[int, str]] = []
        self._lines = lines

    def problem(self, path: str, message: str) -> None:
        line = self._lines.get(path)
        if line is None:
            parent = path.rsplit(".", 1)[0]
            line = self._lines.get(parent)
        where = f"{path} (line {line})" if line is not None else path
        self._found.append((line or 0, f"{where}: {message}"))

    @property
    def problems(self) -> list[str]:
        """Every problem found, in file order."""
        return [text for _, text in sorted(self._found, key=lambda item: item[0])]

    def table(self, doc: Mapping[str, Any], path: str, key: str) -> Mapping[str, Any]:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            self.problem(_join(path, key), f"must be a table, not {_kind(value)}")
            return {}
        return value

    def unknown(self, table: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.problem(_join(path, key), f"unknown key (expected one of: {hint})")

    def get(
        self,
        table: Mapping[str, Any],
        path: str,
        key: str,
        *,
        kind: type | tuple[type, ...],
        default: T,
        convert: Callable[[Any], T],
    ) -> T:
        if key not in table:
            return default
        value = table[key]
        where = _join(path, key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_article(k.__name__) for k in kinds)
            self.problem(where, f"must be {names}, not {_kind(value)}")
            return default
        try:
            return convert(value)
        except (ValueError, ImagepushdError) as exc:
            self.problem(where, str(exc))
            return default

    def strings(self, table: Mapping[str, Any], path: str, key: str) -> tuple[str, ...] | None:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(_join(path, key), "must be a string or a list of strings")
            return None
        return tuple(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _same(value: Any) -> Any:
    return value


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _rate(value: float) -> float:
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of requests per second (e.g. 10 or 0.5)")
    return float(value)


def _size(value: str | int) -> int:
    size = value if isinstance(value, int) else parse_size(value)
    if size < 1:
        raise ValueError("must be positive")
    return size


def parse_config(text: str, source: str, env: Mapping[str, str]) -> Config:
    """Validate TOML ``text``; raise :class:`ConfigError` listing every problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    check = _Checker(_locate(text))
    check.unknown(doc, "", {"containerd", "state", "push", "rule", "registries", "metrics"})

    ctr = check.table(doc, "", "containerd")
    check.unknown(ctr, "containerd", {"root", "namespaces"})
    containerd = ContainerdSettings(
        root=check.get(ctr, "containerd", "root", kind=str, default=None, convert=Path),
        namespaces=check.strings(ctr, "containerd", "namespaces"),
    )

    state = check.table(doc, "", "state")
    check.unknown(state, "state", {"path"})
    state_path = check.get(
        state, "state", "path", kind=str, default=_default_state(env), convert=Path
    )

    push = _push_settings(check, check.table(doc, "", "push"))
    rules = _rules(check, doc.get("rule", []))
    registries = _registries(check, check.table(doc, "", "registries"))
    metrics = _metrics(check, doc)
    if check.problems:
        raise ConfigError(source, check.problems)
    return Config(containerd, state_path, push, rules, registries, source, metrics)


def _metrics(check: _Checker, doc: Mapping[str, Any]) -> MetricsSettings:
    if "metrics" not in doc:
        return MetricsSettings()
    table = check.table(doc, "", "metrics")
    check.unknown(table, "metrics", {"listen"})
    if "listen" not in table and isinstance(doc["metrics"], dict):
        check.problem("metrics.listen", 'is required in [metrics] (e.g. "127.0.0.1:9464")')
    listen = check.get(table, "metrics", "listen", kind=str, default=None, convert=parse_listen)
    return MetricsSettings(listen)


def _push_settings(check: _Checker, table: Mapping[str, Any]) -> PushSettings:
    p = "push"
    defaults = PushSettings()
    check.unknown(table, p, set(PushSettings.__dataclass_fields__))
    on_start = check.get(table, p, "on_start", kind=str, default=defaults.on_start, convert=_same)
    if on_start not in ("new-only", "all"):
        check.problem(f"{p}.on_start", f'must be "new-only" or "all", not {on_start!r}')

    def duration(key: str, default: float) -> float:
        return check.get(
            table,
            p,
            key,
            kind=(str, int, float),
            default=default,
            convert=lambda v: parse_duration(v) if isinstance(v, str) else float(v),
        )

    return PushSettings(
        concurrency=check.get(
            table, p, "concurrency", kind=int, default=defaults.concurrency, convert=_positive
        ),
        parallel_images=check.get(
            table,
            p,
            "parallel_images",
            kind=int,
            default=defaults.parallel_images,
            convert=_positive,
        ),
        chunk_size=check.get(
            table, p, "chunk_size", kind=(str, int), default=defaults.chunk_size, convert=_size
        ),
        platforms=check.get(
            table,
            p,
            "platforms",
            kind=(str, list),
            default=defaults.platforms,
            convert=PlatformPolicy.parse,
        ),
        on_start=on_start,
        settle=duration("settle", defaults.settle),
        retry_attempts=check.get(
            table, p, "retry_attempts", kind=int, default=defaults.retry_attempts, convert=_positive
        ),
        retry_initial=duration("retry_initial", defaults.retry_initial),
        retry_max=duration("retry_max", defaults.retry_max),
        job_backoff_initial=duration("job_backoff_initial", defaults.job_backoff_initial),
        job_backoff_max=duration("job_backoff_max", defaults.job_backoff_max),
        resync_interval=duration("resync_interval", defaults.resync_interval),
    )


def _globs(check: _Checker, path: str, patterns: tuple[str, ...] | None) -> tuple[Glob, ...]:
    out = []
    for i, pattern in enumerate(patterns or ()):
        try:
            out.append(Glob.compile(pattern))
        except ValueError as exc:
            check.problem(f"{path}[{i}]" if len(patterns or ()) > 1 else path, str(exc))
    return tuple(out)


def _rules(check: _Checker, raw: object) -> tuple[Rule, ...]:
    if not isinstance(raw, list):
        check.problem("rule", "must be an array of tables ([[rule]])")
        return ()
    rules = []
    for index, table in enumerate(raw):
        if not isinstance(table, dict):
            check.problem(f"rule[{index}]", "must be a table")
            continue
        rules.append(_rule(check, index, table))
    return tuple(rules)


def _rule(check: _Checker, index: int, table: Mapping[str, Any]) -> Rule:
    p = f"rule[{index}]"
    check.unknown(table, p, {"match", "exclude", "namespaces", "target", "targets", "referrers"})
    patterns = check.strings(table, p, "match")
    if not patterns:
        check.problem(f"{p}.match", "is required (one or more name patterns)")
    match = _globs(check, f"{p}.match", patterns)
    exclude = _globs(check, f"{p}.exclude", check.strings(table, p, "exclude"))
    templates = _targets(check, table, p)
    referrers = check.get(table, p, "referrers", kind=bool, default=False, convert=_same)
    return Rule(index, match, exclude, check.strings(table, p, "namespaces"), templates, referrers)


def _targets(check: _Checker, table: Mapping[str, Any], p: str) -> tuple[str, ...]:
    if "target" in table and "targets" in table:
        check.problem(p, "set target or targets, not both")
    key = "targets" if "targets" in table else "target"
    templates = check.strings(table, p, key) or ("{image}",)
    for template in templates:
        try:
            check_template(template)
        except ValueError as exc:
            check.problem(f"{p}.{key}", str(exc))
    return templates


def _registries(check: _Checker, table: Mapping[str, Any]) -> dict[str, RegistrySettings]:
    out: dict[str, RegistrySettings] = {}
    for host, raw in table.items():
        p = f'registries."{host}"'
        if not isinstance(raw, dict):
            check.problem(p, "must be a table")
            continue
        check.unknown(raw, p, set(RegistrySettings.__dataclass_fields__))
        settings = RegistrySettings(
            plain_http=check.get(raw, p, "plain_http", kind=bool, default=False, convert=_same),
            ca_file=check.get(raw, p, "ca_file", kind=str, default=None, convert=Path),
            username=check.get(raw, p, "username", kind=str, default=None, convert=_same),
            password_file=check.get(raw, p, "password_file", kind=str, default=None, convert=Path),
            password_credential=check.get(
                raw, p, "password_credential", kind=str, default=None, convert=_same
            ),
            chunk_size=check.get(
                raw, p, "chunk_size", kind=(str, int), default=None, convert=_size
            ),
            concurrency=check.get(raw, p, "concurrency", kind=int, default=None, convert=_positive),
            requests_per_second=check.get(
                raw, p, "requests_per_second", kind=(int, float), default=None, convert=_rate
            ),
            max_concurrent_requests=check.get(
                raw, p, "max_concurrent_requests", kind=int, default=None, convert=_positive
            ),
        )
        if settings.password_file and settings.password_credential:
            check.problem(p, "set password_file or password_credential, not both")
        if (settings.password_file or settings.password_credential) and not settings.username:
            check.problem(f"{p}.username", "is required with a password")
        out[host] = settings
    return out
