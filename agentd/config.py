"""Daemon configuration: one attrs record built from a TOML file overlaid with command-line flags.

Precedence, lowest first: built-in defaults, the `--config` TOML file, command-line flags. Unknown keys
in the file are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import attrs
import msgspec
from msgspec import UNSET, UnsetType

from agentd import typed_toml
from agentd.typed_toml import expect

DEFAULT_TCP_PORT = 3113
#: The operator listener's default port (/metrics; Coder's --prometheus-address default is 2112 too).
DEFAULT_METRICS_PORT = 2112
DEFAULT_SOCKET_NAME = "agentd.sock"
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
Coordinator = Literal["memory", "postgres"]
#: Every numeric setting's finite range (inclusive). Checked with the rest of the file and the flags
#: before anything starts, so inf, nan, 1e15 or a negative never reaches a timer.
#: shutdown_timeout: agentd exits within it + agentd.shutdown.MARGIN; keep that below the unit's
#: TimeoutStopSec (contrib/agentd.service).
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "shutdown_timeout": (0.0, 3600.0),
    "agent_stats_refresh_interval": (1.0, 86400.0),
    "coordinator_heartbeat": (0.1, 60.0),
    "database_timeout": (0.5, 3600.0),
    "first_packet_timeout": (0.5, 300.0),
}
#: Whole-number settings' ranges (inclusive), checked like NUMBER_RANGES.
#: workers: each one holds its own PostgreSQL pool (up to 10 connections + pubsub + coordinator),
#: so 64 workers already need ~800 server connections.
COUNT_RANGES: dict[str, tuple[int, int]] = {
    "workers": (1, 64),
    # Per agent session (issue: one agent must not grow the daemon without bound). Coder's agent runs
    # ~10 concurrent RPCs; a stream past the cap is refused with RST.
    "max_streams_per_agent": (16, 65536),
    # Bytes of partly received DRPC requests one session may hold; a stream that would pass it is reset.
    "request_buffer_bytes": (4 << 20, 1 << 30),  # at least one largest packet (4 MiB)
}


class UserError(Exception):
    """A problem the operator caused and can fix (bad flag, bad file, port in use ...).

    The CLI prints `agentd: <message>` on one line and exits non-zero, without a traceback.
    """


class ConfigError(UserError):
    """The configuration (file or flags) is invalid."""


@attrs.frozen
class UnixAddress:
    """`unix:/path/to.sock` — a Unix stream socket agentd binds (and removes on exit)."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


@attrs.frozen
class TcpAddress:
    """`tcp://HOST:PORT` — a TCP listener; port 0 lets the kernel pick one."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


ListenAddress = UnixAddress | TcpAddress


def parse_listen_address(text: str, *, base_dir: Path | None = None) -> ListenAddress:
    """Parse `unix:/path` or `tcp://HOST:PORT`; relative unix paths resolve against `base_dir`."""
    if text.startswith("unix:"):
        raw = text[len("unix:") :]
        if raw.startswith("//"):
            raw = raw[2:]
        if not raw:
            raise ConfigError(f"listen address {text!r}: the unix socket path is empty")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        return UnixAddress(path)
    if text.startswith("tcp://"):
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"listen address {text!r}: the port is not a number in 0..65535") from None
        if parts.hostname is None or port is None:
            raise ConfigError(f"listen address {text!r}: expected tcp://HOST:PORT")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ConfigError(
                f"listen address {text!r}: expected tcp://HOST:PORT with nothing after the port"
            )
        return TcpAddress(parts.hostname, port)
    raise ConfigError(f"listen address {text!r}: expected unix:/path/to.sock or tcp://HOST:PORT")


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_DATA_HOME/agentd`, i.e. `~/.local/share/agentd` when XDG_DATA_HOME is unset or relative."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path("~/.local/share").expanduser()
    return base / "agentd"


def _validate_log_level(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in LOG_LEVELS:
        raise ConfigError(f"log_level {value!r}: expected one of {', '.join(LOG_LEVELS)}")


def _validate_coordinator(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in ("memory", "postgres"):
        raise ConfigError(f'coordinator {value!r}: expected "memory" or "postgres"')


def check_number(key: str, value: float) -> float:
    """`value` as a float if it lies in `key`'s range, else a one-line error naming field and range
    (the config file's own check is ConfigFile's, with the same ranges and words)."""
    low, high = NUMBER_RANGES[key]
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"field {key!r} must be a number of seconds in {low:g}..{high:g}, got {value:g}")
    return float(value)


def _validate_number(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    check_number(attr.name, value)


def check_count(key: str, value: object) -> int:
    """`value` if it is a whole number in `key`'s range, else a one-line error naming field and range."""
    low, high = COUNT_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"field {key!r} must be a whole number in {low}..{high}, got {value!r}")
    return value


def _validate_count(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    check_count(attr.name, value)


@attrs.frozen
class Config:
    """Everything `agentd serve` needs; `listen == ()` means the defaults (see `listen_addresses`)."""

    data_dir: Path = attrs.field(factory=default_data_dir)
    postgres_url: str | None = None
    listen: tuple[ListenAddress, ...] = ()
    log_level: str = attrs.field(default="info", validator=_validate_log_level)
    shutdown_timeout: float = attrs.field(default=10.0, validator=_validate_number)
    #: Seconds between an agent's UpdateStats reports, told to every agent (Coder's
    #: --agent-stats-refresh-interval; its default is 30 s).
    agent_stats_refresh_interval: float = attrs.field(default=30.0, validator=_validate_number)
    #: The tailnet coordinator: "postgres" (state in the database, shared by every replica on it) or
    #: "memory" (this process only; a little faster, wrong as soon as a second replica shares the database).
    coordinator: str = attrs.field(default="postgres", validator=_validate_coordinator)
    #: Seconds between the postgres coordinator's heartbeats; a replica silent for 3 of them is dead.
    coordinator_heartbeat: float = attrs.field(default=2.0, validator=_validate_number)
    #: Client-side bound, in seconds, on every database call (waiting for a pooled connection and
    #: the statement); past it the call fails with "database unavailable". Below the agent's 10 s RPC
    #: timeout so an agent sees the database error, not its own timeout (agentd.store.db).
    database_timeout: float = attrs.field(default=8.0, validator=_validate_number)
    #: As root: let pgserver add g+rx,o+rx to the data dir's parents (--allow-chmod; flag only).
    allow_chmod: bool = False
    #: Settings fields from the `[banners]` table (agentd.services.banners.banners_from_mapping).
    banners: tuple[tuple[str, Any], ...] = ()
    #: Where operator endpoints (/metrics, /healthz) are served, apart from the agent listeners;
    #: None: nowhere ("none" in the file or flag).
    metrics_listen: ListenAddress | None = TcpAddress("127.0.0.1", DEFAULT_METRICS_PORT)
    #: Worker processes of `agentd serve` (agentd.workers). 1: one process, no parent, as before.
    workers: int = attrs.field(default=1, validator=_validate_count)
    #: Per agent session: concurrent streams (past it: RST), bytes of partly received requests
    #: (past it: that stream reset), and seconds a new stream has to deliver its first whole packet.
    max_streams_per_agent: int = attrs.field(default=256, validator=_validate_count)
    request_buffer_bytes: int = attrs.field(default=16 << 20, validator=_validate_count)
    first_packet_timeout: float = attrs.field(default=10.0, validator=_validate_number)

    def __attrs_post_init__(self) -> None:
        if self.workers > 1 and self.coordinator == "memory":
            raise ConfigError(
                f'workers = {self.workers} needs coordinator = "postgres": with "memory" each worker '
                "would be a tailnet of its own"
            )

    def default_listen_addresses(self) -> tuple[ListenAddress, ...]:
        return (UnixAddress(self.data_dir / DEFAULT_SOCKET_NAME), TcpAddress("127.0.0.1", DEFAULT_TCP_PORT))

    def listen_addresses(self, *, socket_activated: bool = False) -> tuple[ListenAddress, ...]:
        """The addresses to bind: the configured ones, else the defaults unless systemd passed sockets."""
        if self.listen:
            return self.listen
        return () if socket_activated else self.default_listen_addresses()


def _seconds(key: str) -> msgspec.Meta:
    low, high = NUMBER_RANGES[key]
    return expect(f"a number of seconds in {low:g}..{high:g}", ge=low, le=high)


def _count(key: str) -> msgspec.Meta:
    low, high = COUNT_RANGES[key]
    return expect(f"a whole number in {low}..{high}", ge=low, le=high)


class ConfigFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The `--config` TOML file as written (UNSET: not in the file); `config_values_from_mapping`
    makes it Config keyword arguments. Ranges come from NUMBER_RANGES and COUNT_RANGES, as for the flags."""

    data_dir: str | UnsetType = UNSET
    postgres_url: str | UnsetType = UNSET
    listen: tuple[str, ...] | UnsetType = UNSET
    log_level: Annotated[LogLevel, expect("one of " + ", ".join(LOG_LEVELS))] | UnsetType = UNSET
    shutdown_timeout: Annotated[float, _seconds("shutdown_timeout")] | UnsetType = UNSET
    agent_stats_refresh_interval: Annotated[float, _seconds("agent_stats_refresh_interval")] | UnsetType = (
        UNSET
    )
    #: The `[banners]` table, checked by agentd.services.banners.
    banners: dict[str, Any] | UnsetType = UNSET
    metrics_listen: Annotated[str, expect('an address string or "none"')] | UnsetType = UNSET
    coordinator: Annotated[Coordinator, expect('"memory" or "postgres"')] | UnsetType = UNSET
    coordinator_heartbeat: Annotated[float, _seconds("coordinator_heartbeat")] | UnsetType = UNSET
    database_timeout: Annotated[float, _seconds("database_timeout")] | UnsetType = UNSET
    workers: Annotated[int, _count("workers")] | UnsetType = UNSET
    max_streams_per_agent: Annotated[int, _count("max_streams_per_agent")] | UnsetType = UNSET
    request_buffer_bytes: Annotated[int, _count("request_buffer_bytes")] | UnsetType = UNSET
    first_packet_timeout: Annotated[float, _seconds("first_packet_timeout")] | UnsetType = UNSET


def read_config_file(path: Path) -> dict[str, Any]:
    """Read and strictly validate a config file; returns Config keyword arguments."""
    raw = typed_toml.read_toml(path, ConfigError)
    return config_values_from_mapping(raw, source=str(path), base_dir=path.parent.resolve())


def config_values_from_mapping(raw: Mapping[str, Any], *, source: str, base_dir: Path) -> dict[str, Any]:
    """Validate a parsed config table (strict: unknown keys are errors) and convert it."""
    try:
        file = typed_toml.convert(raw, ConfigFile)
    except typed_toml.Problem as problem:
        raise _file_error(source, problem) from None
    out: dict[str, Any] = {}
    for key, value in msgspec.structs.asdict(file).items():
        if value is UNSET:
            continue
        if key == "data_dir":
            out[key] = _resolve_path(value, base_dir)
        elif key == "listen":
            out[key] = tuple(_parse_in(source, item, base_dir) for item in value)
        elif key == "metrics_listen":
            out[key] = None if value in ("", "none") else _parse_in(source, value, base_dir)
        elif key == "banners":
            from agentd.services.banners import BannerConfigError, banners_from_mapping

            try:
                out[key] = tuple(banners_from_mapping(value).items())
            except BannerConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        else:
            out[key] = value
    return out


def _file_error(source: str, problem: typed_toml.Problem) -> ConfigError:
    """A top-level key is "field 'x'" (as for the flags' checks); a nested one its dotted path."""
    if problem.kind == "unknown" and problem.path.isidentifier():
        known = ", ".join(sorted(problem.allowed))
        return ConfigError(f"{source}: unknown field {problem.path!r} (known fields: {known})")
    if problem.path.isidentifier():
        return ConfigError(f"{source}: field {problem.path!r} {problem.text}")
    return ConfigError(f"{source}: {problem}")


def _parse_in(source: str, text: str, base_dir: Path) -> ListenAddress:
    try:
        return parse_listen_address(text, base_dir=base_dir)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def build_config(
    *,
    config_file: Path | None = None,
    data_dir: Path | None = None,
    postgres_url: str | None = None,
    listen: Iterable[str] = (),
    log_level: str | None = None,
    agent_stats_refresh_interval: float | None = None,
    metrics_listen: str | None = None,
    allow_chmod: bool = False,
    workers: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Defaults < config file < flags. Flag values are passed as given on the command line."""
    values: dict[str, Any] = {"data_dir": default_data_dir(environ)}
    if config_file is not None:
        values.update(read_config_file(config_file))
    if data_dir is not None:
        values["data_dir"] = data_dir.expanduser().resolve()
    if postgres_url is not None:
        values["postgres_url"] = postgres_url
    flags = tuple(parse_listen_address(text) for text in listen)
    if flags:
        values["listen"] = flags
    if log_level is not None:
        values["log_level"] = log_level
    if agent_stats_refresh_interval is not None:
        low, high = NUMBER_RANGES["agent_stats_refresh_interval"]
        if not (math.isfinite(agent_stats_refresh_interval) and low <= agent_stats_refresh_interval <= high):
            raise ConfigError(
                f"--agent-stats-refresh-interval must be a number of seconds in {low:g}..{high:g}, "
                f"got {agent_stats_refresh_interval:g}"
            )
        values["agent_stats_refresh_interval"] = float(agent_stats_refresh_interval)
    values["allow_chmod"] = allow_chmod
    if metrics_listen is not None:
        values["metrics_listen"] = (
            None if metrics_listen in ("", "none") else parse_listen_address(metrics_listen)
        )
    if workers is not None:
        low, high = COUNT_RANGES["workers"]
        if not low <= workers <= high:
            raise ConfigError(f"--workers must be a whole number in {low}..{high}, got {workers}")
        values["workers"] = workers
    if values.get("postgres_url") == "":
        raise ConfigError("postgres_url is empty")
    return Config(**values)


def reread_config(reload: Callable[[], Config], running: Config, log: logging.Logger) -> Config | None:
    """SIGHUP's re-read: the new configuration with its log level applied to the process, or None
    when the file is broken (logged; the running configuration stays, so a typo never stops agentd)."""
    try:
        new = reload()
    except UserError as e:
        log.error("reload failed, keeping the running configuration: %s", e)
        return None
    if new.log_level != running.log_level:
        logging.getLogger().setLevel(new.log_level.upper())
        log.info("log level is now %s", new.log_level)
    return new
