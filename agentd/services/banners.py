"""GetServiceBanner and GetAnnouncementBanners (spec §7.2, §7.3): the deployment's banners.

Coder reads them from the appearance fetcher; agentd takes them from ``Settings`` (the daemon's
``[banners]`` configuration table, parsed by :func:`banners_from_mapping`). The agent polls
GetAnnouncementBanners at start and every two minutes, and any error there ends its connection, so
these handlers never fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import attrs
import msgspec
import trio

from agentd import typed_toml
from agentd.drpc.registry import Handler
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope, Settings
from agentd.typed_toml import expect

__all__ = [
    "BannerConfigError",
    "BannerTable",
    "BannersService",
    "BannersTable",
    "banners_from_mapping",
    "build",
]

Banner = tuple[bool, str, str]


@attrs.define(eq=False)
class BannersService:
    """Answers from ``settings`` (immutable; a reload makes new connections see new banners)."""

    settings: Settings

    def handlers(self) -> dict[str, Handler]:
        return {
            AGENT + "GetServiceBanner": self.get_service_banner,
            AGENT + "GetAnnouncementBanners": self.get_announcement_banners,
        }

    async def get_service_banner(self, request: agent_pb2.GetServiceBannerRequest) -> agent_pb2.ServiceBanner:
        """Deprecated since API 2.1; still answered for old agents."""
        await trio.lowlevel.checkpoint()
        enabled, message, color = self.settings.service_banner
        return agent_pb2.ServiceBanner(enabled=enabled, message=message, background_color=color)

    async def get_announcement_banners(
        self, request: agent_pb2.GetAnnouncementBannersRequest
    ) -> agent_pb2.GetAnnouncementBannersResponse:
        await trio.lowlevel.checkpoint()
        return agent_pb2.GetAnnouncementBannersResponse(
            announcement_banners=[
                agent_pb2.BannerConfig(enabled=enabled, message=message, background_color=color)
                for enabled, message, color in self.settings.announcement_banners
            ]
        )


def build(scope: ConnectionScope) -> BannersService:
    return BannersService(scope.settings)


class BannerConfigError(ValueError):
    """A ``[banners]`` table that does not have the documented shape; the text names the key."""


class BannerTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One banner: ``[banners.service]`` or an entry of ``[[banners.announcement]]``."""

    enabled: bool = True
    message: str = ""
    background_color: Annotated[str, expect('a string like "#004852"')] = ""

    def as_tuple(self) -> Banner:
        return (self.enabled, self.message, self.background_color)


class BannersTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The daemon configuration's ``[banners]`` table (None: not set, the Settings default stays)."""

    service: BannerTable | None = None
    announcement: tuple[BannerTable, ...] | None = None


def banners_from_mapping(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Settings fields from a config file's ``[banners]`` table::

        [banners.service]                       # GetServiceBanner (agents before API 2.1)
        enabled = true
        message = "Maintenance at 18:00 UTC"
        background_color = "#004852"

        [[banners.announcement]]                # GetAnnouncementBanners, in order
        message = "Welcome"                     # enabled defaults to true

    Returns ``{"service_banner": ..., "announcement_banners": ...}`` for ``attrs.evolve(settings, **it)``.
    Raises BannerConfigError naming the offending key.
    """
    try:
        table = typed_toml.convert(raw, BannersTable, root="banners")
    except typed_toml.Problem as problem:
        raise BannerConfigError(str(problem)) from None
    out: dict[str, Any] = {}
    if table.service is not None:
        out["service_banner"] = table.service.as_tuple()
    if table.announcement is not None:
        out["announcement_banners"] = tuple(banner.as_tuple() for banner in table.announcement)
    return out
