"""Configuration: address parsing, strict TOML files, and defaults < file < flags."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agentd.config import (
    NUMBER_RANGES,
    Config,
    ConfigError,
    TcpAddress,
    UnixAddress,
    build_config,
    default_data_dir,
    parse_listen_address,
)


def test_parse_listen_addresses() -> None:
    assert parse_listen_address("unix:/run/agentd.sock") == UnixAddress(Path("/run/agentd.sock"))
    assert parse_listen_address("unix:rel.sock", base_dir=Path("/etc")) == UnixAddress(Path("/etc/rel.sock"))
    assert parse_listen_address("tcp://127.0.0.1:3113") == TcpAddress("127.0.0.1", 3113)
    assert parse_listen_address("tcp://[::1]:0") == TcpAddress("::1", 0)
    assert str(TcpAddress("::1", 80)) == "tcp://[::1]:80"
    assert str(UnixAddress(Path("/a.sock"))) == "unix:/a.sock"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("http://x:1", "expected unix:/path/to.sock or tcp://HOST:PORT"),
        ("tcp://host", "expected tcp://HOST:PORT"),
        ("tcp://host:99999", "port is not a number"),
        ("tcp://host:80/path", "nothing after the port"),
        ("unix:", "path is empty"),
    ],
)
def test_bad_listen_address_names_the_problem(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        parse_listen_address(text)
    assert repr(text) in str(info.value)


def test_default_data_dir_follows_xdg() -> None:
    assert default_data_dir({"XDG_DATA_HOME": "/xdg"}) == Path("/xdg/agentd")
    assert default_data_dir({}) == Path("~/.local/share/agentd").expanduser()
    assert default_data_dir({"XDG_DATA_HOME": "relative"}) == Path("~/.local/share/agentd").expanduser()


def test_defaults_listen_on_data_dir_socket_and_port_3113(tmp_path: Path) -> None:
    config = build_config(data_dir=tmp_path)
    assert config.postgres_url is None
    assert config.listen_addresses() == (UnixAddress(tmp_path / "agentd.sock"), TcpAddress("127.0.0.1", 3113))
    # socket-activated without explicit addresses: only the inherited sockets
    assert config.listen_addresses(socket_activated=True) == ()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_file_values_are_used_and_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    file = _write(
        tmp_path / "agentd.toml",
        'data_dir = "state"\npostgres_url = "postgresql://db/x"\n'
        'listen = ["unix:a.sock", "tcp://0.0.0.0:9"]\nlog_level = "debug"\nshutdown_timeout = 3\n',
    )
    config = build_config(config_file=file)
    assert config == Config(
        data_dir=tmp_path / "state",
        postgres_url="postgresql://db/x",
        listen=(UnixAddress(tmp_path / "a.sock"), TcpAddress("0.0.0.0", 9)),
        log_level="debug",
        shutdown_timeout=3.0,
    )


def test_flags_override_the_file(tmp_path: Path) -> None:
    file = _write(
        tmp_path / "agentd.toml",
        'data_dir = "/from/file"\npostgres_url = "postgresql://file/x"\nlisten = ["tcp://127.0.0.1:1"]\n',
    )
    config = build_config(
        config_file=file,
        data_dir=tmp_path / "flag",
        postgres_url="postgresql://flag/y",
        listen=["tcp://127.0.0.1:2", "unix:/tmp/flag.sock"],
        log_level="error",
    )
    assert config.data_dir == tmp_path / "flag"
    assert config.postgres_url == "postgresql://flag/y"
    assert config.listen == (TcpAddress("127.0.0.1", 2), UnixAddress(Path("/tmp/flag.sock")))
    assert config.log_level == "error"
    # a flag that is not given leaves the file's value alone
    partial = build_config(config_file=file, listen=[])
    assert partial.listen == (TcpAddress("127.0.0.1", 1),)
    assert partial.data_dir == Path("/from/file")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("data_dir = [", "invalid TOML"),
        ('datadir = "/x"', "unknown field 'datadir'"),
        ("listen = 5", "field 'listen' must be an array of strings"),
        ("listen = [5]", r"bad\.toml: listen\[0\]: must be a string, got 5"),
        ('listen = ["ftp://x"]', "listen address 'ftp://x'"),
        (
            'log_level = "loud"',
            r"bad\.toml: field 'log_level' must be one of debug, info, warning, error, got 'loud'",
        ),
        ("shutdown_timeout = true", "field 'shutdown_timeout' must be a number"),
        ("shutdown_timeout = -1", r"bad\.toml: field 'shutdown_timeout' must be .* in 0\.\.3600, got -1"),
        ("shutdown_timeout = inf", r"field 'shutdown_timeout' .* in 0\.\.3600, got inf"),
        ("shutdown_timeout = nan", r"field 'shutdown_timeout' .* got nan"),
        ("shutdown_timeout = 1e15", r"field 'shutdown_timeout' .* got 1e\+15"),
        ("agent_stats_refresh_interval = inf", r"'agent_stats_refresh_interval' .* in 1\.\.86400, got inf"),
        ("agent_stats_refresh_interval = -inf", r"'agent_stats_refresh_interval' .* got -inf"),
        ("agent_stats_refresh_interval = 1e15", r"'agent_stats_refresh_interval' .* got 1e\+15"),
        ('postgres_url = ""', "postgres_url is empty"),
    ],
)
def test_bad_config_file_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    file = _write(tmp_path / "bad.toml", text + "\n")
    with pytest.raises(ConfigError, match=needle):
        build_config(config_file=file)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        build_config(config_file=tmp_path / "absent.toml")


def test_shipped_config_file_is_valid() -> None:
    shipped = Path(__file__).resolve().parent.parent / "contrib" / "agentd.toml"
    config = build_config(config_file=shipped)
    assert config.data_dir == Path("/var/lib/agentd")
    assert config.listen_addresses(socket_activated=True) == ()


def test_agent_stats_refresh_interval_file_flag_and_validation(tmp_path: Path) -> None:
    assert build_config(environ={}).agent_stats_refresh_interval == 30.0
    path = tmp_path / "agentd.toml"
    path.write_text("agent_stats_refresh_interval = 5\n")
    assert build_config(config_file=path, environ={}).agent_stats_refresh_interval == 5.0
    flagged = build_config(config_file=path, agent_stats_refresh_interval=2.5, environ={})
    assert flagged.agent_stats_refresh_interval == 2.5
    path.write_text("agent_stats_refresh_interval = 0\n")
    with pytest.raises(ConfigError, match=r"agentd\.toml: field 'agent_stats_refresh_interval' must be"):
        build_config(config_file=path, environ={})
    for bad in (-1.0, 0.0, math.inf, math.nan, 1e15):
        with pytest.raises(ConfigError, match=r"^--agent-stats-refresh-interval must be .* in 1\.\.86400"):
            build_config(agent_stats_refresh_interval=bad, environ={})


@pytest.mark.parametrize("key", sorted(NUMBER_RANGES))
def test_every_numeric_setting_has_a_finite_range(key: str) -> None:
    low, high = NUMBER_RANGES[key]
    assert math.isfinite(low) and math.isfinite(high) and 0 <= low < high
    for bad in (math.inf, -math.inf, math.nan, low - 1, high * 10):
        with pytest.raises(ConfigError, match=f"field '{key}' must be"):
            Config(**{key: bad})


def test_metrics_listen_default_file_flag_and_off(tmp_path: Path) -> None:
    assert build_config().metrics_listen == TcpAddress("127.0.0.1", 2112)  # localhost only
    file = _write(tmp_path / "agentd.toml", 'metrics_listen = "unix:metrics.sock"\n')
    assert build_config(config_file=file).metrics_listen == UnixAddress(tmp_path / "metrics.sock")
    assert build_config(config_file=file, metrics_listen="tcp://[::1]:9").metrics_listen == TcpAddress(
        "::1", 9
    )
    assert build_config(config_file=file, metrics_listen="none").metrics_listen is None
    assert (
        build_config(config_file=_write(tmp_path / "off.toml", 'metrics_listen = "none"\n')).metrics_listen
        is None
    )
    with pytest.raises(ConfigError, match="metrics_listen"):
        build_config(config_file=_write(tmp_path / "bad.toml", "metrics_listen = 1\n"))
    with pytest.raises(ConfigError, match="expected unix"):
        build_config(metrics_listen="localhost:2112")


def test_coordinator_choice_and_heartbeat(tmp_path: Path) -> None:
    default = build_config(environ={})
    assert (default.coordinator, default.coordinator_heartbeat) == ("postgres", 2.0)
    path = tmp_path / "agentd.toml"
    path.write_text('coordinator = "memory"\ncoordinator_heartbeat = 0.5\n')
    config = build_config(config_file=path, environ={})
    assert (config.coordinator, config.coordinator_heartbeat) == ("memory", 0.5)
    path.write_text('coordinator = "etcd"\n')
    with pytest.raises(
        ConfigError, match="field 'coordinator' must be \"memory\" or \"postgres\", got 'etcd'"
    ):
        build_config(config_file=path, environ={})
    path.write_text("coordinator_heartbeat = 0\n")
    with pytest.raises(ConfigError, match="'coordinator_heartbeat' must be a number of seconds in"):
        build_config(config_file=path, environ={})


def test_database_timeout(tmp_path: Path) -> None:
    assert build_config(environ={}).database_timeout == 8.0
    path = tmp_path / "agentd.toml"
    path.write_text("database_timeout = 2.5\n")
    assert build_config(config_file=path, environ={}).database_timeout == 2.5
    path.write_text("database_timeout = 0\n")
    with pytest.raises(ConfigError, match="'database_timeout' must be a number of seconds in"):
        build_config(config_file=path, environ={})


def test_per_agent_limits_from_the_file_are_checked(tmp_path: Path) -> None:
    file = _write(
        tmp_path / "agentd.toml",
        "max_streams_per_agent = 64\nrequest_buffer_bytes = 8388608\nfirst_packet_timeout = 2.5\n",
    )
    config = build_config(config_file=file, environ={})
    assert (config.max_streams_per_agent, config.request_buffer_bytes, config.first_packet_timeout) == (
        64,
        8 << 20,
        2.5,
    )
    defaults = build_config(environ={})
    assert (defaults.max_streams_per_agent, defaults.request_buffer_bytes) == (256, 16 << 20)
    for text, message in (
        (
            "max_streams_per_agent = 8\n",
            r"field 'max_streams_per_agent' must be a whole number in 16\.\.65536",
        ),
        (
            "request_buffer_bytes = 1024\n",
            r"field 'request_buffer_bytes' must be a whole number in 4194304\.",
        ),
        ("max_streams_per_agent = 64.5\n", r"field 'max_streams_per_agent' must be a whole number"),
        (
            "first_packet_timeout = 0\n",
            r"field 'first_packet_timeout' must be a number of seconds in 0\.5\.\.300",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            build_config(config_file=_write(tmp_path / "bad.toml", text), environ={})
