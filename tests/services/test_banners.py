"""GetServiceBanner / GetAnnouncementBanners (spec §7.2, §7.3) from Settings and the [banners] table."""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path

import attrs
import pytest
import trio

from agentd.proto import agent_pb2
from agentd.services.banners import BannerConfigError, BannersService, banners_from_mapping
from agentd.services.base import Settings
from agentd.store import Database
from agentd.testing import serve_agent
from tests.test_connection import seed

CONFIG = """
[banners.service]
enabled = true
message = "Maintenance at 18:00 UTC"
background_color = "#004852"

[[banners.announcement]]
message = "Welcome"

[[banners.announcement]]
enabled = false
message = "Old news"
background_color = "#ff0000"
"""


def test_banners_table_parses_into_settings() -> None:
    fields = banners_from_mapping(tomllib.loads(CONFIG)["banners"])
    settings = attrs.evolve(Settings(), **fields)
    assert settings.service_banner == (True, "Maintenance at 18:00 UTC", "#004852")
    assert settings.announcement_banners == ((True, "Welcome", ""), (False, "Old news", "#ff0000"))


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"servce": {}}, r"^banners\.servce: unknown field \(allowed: service, announcement\)$"),
        ({"service": "on"}, "^banners.service: must be a table, got 'on'$"),
        ({"service": {"enabled": "yes"}}, "^banners.service.enabled: must be true or false, got 'yes'$"),
        (
            {"service": {"colour": "#fff"}},
            r"^banners\.service\.colour: unknown field \(allowed: enabled, message,",
        ),
        (
            {"announcement": {"message": "x"}},
            "^banners.announcement: must be an array of tables, got a table$",
        ),
        ({"announcement": [{"message": 3}]}, r"^banners.announcement\[0\].message: must be a string, got 3$"),
        ({"announcement": [{}, {"background_color": 1}]}, r"banners.announcement\[1\].background_color"),
    ],
)
def test_bad_banner_tables_name_the_key(raw: dict[str, object], error: str) -> None:
    with pytest.raises(BannerConfigError, match=error):
        banners_from_mapping(raw)


async def test_defaults_are_empty() -> None:
    service = BannersService(Settings())
    assert await service.get_announcement_banners(agent_pb2.GetAnnouncementBannersRequest()) == (
        agent_pb2.GetAnnouncementBannersResponse()
    )
    assert await service.get_service_banner(agent_pb2.GetServiceBannerRequest()) == agent_pb2.ServiceBanner()


async def test_configured_banners_reach_the_agent(db: Database, nursery: trio.Nursery) -> None:
    ws = await seed(db)
    settings = attrs.evolve(Settings(), **banners_from_mapping(tomllib.loads(CONFIG)["banners"]))
    agent = await nursery.start(
        functools.partial(serve_agent, db, ws.agents[0].token, settings=settings, services=("banners",))
    )
    response = await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
    assert list(response.announcement_banners) == [
        agent_pb2.BannerConfig(enabled=True, message="Welcome"),
        agent_pb2.BannerConfig(enabled=False, message="Old news", background_color="#ff0000"),
    ]
    banner = await agent.client.agent.GetServiceBanner(agent_pb2.GetServiceBannerRequest())
    assert banner == agent_pb2.ServiceBanner(
        enabled=True, message="Maintenance at 18:00 UTC", background_color="#004852"
    )


def test_daemon_config_file_carries_banners(tmp_path: Path) -> None:
    from agentd.config import Config, ConfigError, read_config_file

    path = tmp_path / "agentd.toml"
    path.write_text('log_level = "info"\n' + CONFIG)
    config = Config(**read_config_file(path))
    settings = Settings(**dict(config.banners))
    assert settings.service_banner == (True, "Maintenance at 18:00 UTC", "#004852")
    assert [b[1] for b in settings.announcement_banners] == ["Welcome", "Old news"]

    path.write_text("[banners.service]\nenabled = 1\n")
    with pytest.raises(
        ConfigError, match=r"agentd.toml: banners.service.enabled: must be true or false, got 1$"
    ):
        read_config_file(path)
