"""The hub probe: one short connection attempt decides, and the user's offline setting wins without one."""

from __future__ import annotations

import socket

import pytest

from sumcircuit import hub


def test_unreachable_hub_is_known_after_one_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, float]] = []

    def refuse(address: object, timeout: float) -> socket.socket:
        calls.append((address, timeout))
        raise OSError("no route")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org:8443")
    monkeypatch.setattr(socket, "create_connection", refuse)
    hub.reachable.cache_clear()
    try:
        assert not hub.reachable() and not hub.reachable()
        assert calls == [(("hub.example.org", 8443), hub.PROBE_TIMEOUT_S)]  # asked once, briefly
        assert "hub.example.org cannot be reached" in hub.offline_reason("model 'gpt2'")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        hub.reachable.cache_clear()
        assert not hub.reachable() and len(calls) == 1  # the setting decides without a connection
    finally:
        hub.reachable.cache_clear()
