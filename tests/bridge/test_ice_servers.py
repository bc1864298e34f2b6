"""ICE servers: pools-file entries plus VOXBUS_ICE_SERVERS (TURN credentials stay out of the file)."""

from __future__ import annotations

import pytest

from bridge.transports import rtc_setup
from bridge.transports.webrtc import ICE_SERVERS_ENV, WebRtcTransport
from shared.config import BridgeConfig


def test_turn_credentials_are_split_out_of_the_url() -> None:
    servers = rtc_setup.ice_servers(["stun:stun.example.org:3478", "turn:alice:s3cr%et@turn.example.org:3478?transport=udp"])
    assert [s.urls for s in servers] == ["stun:stun.example.org:3478", "turn:turn.example.org:3478?transport=udp"]
    assert (servers[0].username, servers[0].credential) == (None, None)
    assert (servers[1].username, servers[1].credential) == ("alice", "s3cr%et")
    browser = rtc_setup.ice_servers_json(servers)
    assert browser[1] == {"urls": "turn:turn.example.org:3478?transport=udp", "username": "alice", "credential": "s3cr%et"}
    assert browser[0] == {"urls": "stun:stun.example.org:3478"}


def test_environment_adds_to_the_pools_file(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BridgeConfig(ice_servers=["stun:stun.example.org:3478"])
    monkeypatch.setenv(ICE_SERVERS_ENV, " turn:u:p@turn.example.org:3478  turns:u:p@turn.example.org:5349 ")
    transport = WebRtcTransport(None, cfg, token="t")  # type: ignore[arg-type]  # only the config is read here
    assert [s.urls for s in transport.ice_servers] == [
        "stun:stun.example.org:3478", "turn:turn.example.org:3478", "turns:turn.example.org:5349"]
    monkeypatch.delenv(ICE_SERVERS_ENV)
    assert [s.urls for s in WebRtcTransport(None, cfg, token="t").ice_servers] == ["stun:stun.example.org:3478"]  # type: ignore[arg-type]
