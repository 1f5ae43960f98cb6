"""agentd.logfmt: a value stays one grep-able token, whatever it holds."""

from __future__ import annotations

import uuid

import pytest

from agentd.logfmt import logfmt, quote


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("ok", "ok"),
        (12, "12"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        ("/coder.agent.v2.Agent/GetManifest", "/coder.agent.v2.Agent/GetManifest"),
        ("", '""'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("C:\\dir", '"C:\\\\dir"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("bell\x07\r\u2028", '"bell\\x07\\r\\u2028"'),
        ("café", "café"),
    ],
)
def test_quote(value: object, written: str) -> None:
    assert quote(value) == written


def test_logfmt_keeps_order() -> None:
    assert logfmt({"b": 1, "a": "x y", "c": ""}) == 'b=1 a="x y" c=""'
