from __future__ import annotations

from tests.drpc.svc import EchoService, Req, mux_client


async def test_unary_smoke() -> None:
    svc = EchoService()
    async with mux_client(svc.registry()) as (client, _, _):
        resp = await client.echo.Unary(Req(n=1, text="x"))
        assert resp.n == 2 and resp.text == "x"
