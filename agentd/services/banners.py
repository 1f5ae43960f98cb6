"""GetServiceBanner and GetAnnouncementBanners (spec §7.2, §7.3): the deployment's banners.

Coder reads them from the appearance fetcher; agentd takes them from ``Settings`` (the daemon's
``[banners]`` configuration table, parsed by :func:`banners_from_mapping`). The agent polls
GetAnnouncementBanners at start and every two minutes, and any error there ends its connection, so
these handlers never fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import trio

from agentd.drpc.registry import Handler
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope, Settings

__all__ = ["BannerConfigError", "BannersService", "banners_from_mapping", "build"]

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


_BANNER_KEYS = {"enabled", "message", "background_color"}


def _banner(raw: Any, where: str) -> Banner:
    if not isinstance(raw, Mapping):
        raise BannerConfigError(f"{where}: expected a table with enabled, message, background_color")
    unknown = sorted(set(raw) - _BANNER_KEYS)
    if unknown:
        raise BannerConfigError(f"{where}: unknown key {unknown[0]!r}")
    enabled = raw.get("enabled", True)
    message = raw.get("message", "")
    color = raw.get("background_color", "")
    if not isinstance(enabled, bool):
        raise BannerConfigError(f"{where}.enabled: expected true or false")
    if not isinstance(message, str):
        raise BannerConfigError(f"{where}.message: expected a string")
    if not isinstance(color, str):
        raise BannerConfigError(f'{where}.background_color: expected a string like "#004852"')
    return (enabled, message, color)


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
    unknown = sorted(set(raw) - {"service", "announcement"})
    if unknown:
        raise BannerConfigError(f"banners: unknown key {unknown[0]!r}")
    out: dict[str, Any] = {}
    if "service" in raw:
        out["service_banner"] = _banner(raw["service"], "banners.service")
    if "announcement" in raw:
        items = raw["announcement"]
        if not isinstance(items, list):
            raise BannerConfigError(
                "banners.announcement: expected an array of tables ([[banners.announcement]])"
            )
        out["announcement_banners"] = tuple(
            _banner(item, f"banners.announcement[{i}]") for i, item in enumerate(items)
        )
    return out
