"""aiortc tuning for voice: Opus in-band FEC, the receive jitter-buffer target, ICE servers, loopback ICE.

aiortc has no public knobs for any of these, so this module adjusts its
internals in one place (checked against aiortc 1.16 / aioice 0.13):

- FEC: aiortc answers an Opus offer with the fmtp parameters of ITS codec
  table (`aiortc.codecs.CODECS`), not the offer's, so `useinbandfec=1` must be
  in that table to reach the answer (and every offer this process makes).
  Negotiation alone changes nothing on the wire: the encoder must also be told
  (`fec` and `packet_loss` options of libopus). With them libopus switches from
  CELT-only (TOC config 31) to hybrid/SILK frames that carry LBRR redundancy.
  Only the sending direction benefits: browsers (NetEq) decode FEC, aiortc's
  receiver never asks the decoder to recover a lost frame.
- Jitter buffer: see `set_jitter_target`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import aioice.ice
from aiortc import RTCIceServer, RTCRtpReceiver
from aiortc import codecs as rtc_codecs
from aiortc.codecs.opus import OpusEncoder
from aiortc.jitterbuffer import JitterBuffer

log = logging.getLogger("voxbus.webrtc")

OPUS_FMTP: dict[str, int] = {"useinbandfec": 1, "minptime": 10}
OPUS_ENCODER_OPTIONS: dict[str, str] = {"application": "voip", "fec": "1", "packet_loss": "10"}
PTIME_MS = 20  # aiortc sends and Chromium sends one 20 ms Opus frame per RTP packet


class FecOpusEncoder(OpusEncoder):
    """aiortc's Opus encoder with in-band FEC on (the codec opens lazily, so options set here apply)."""

    def __init__(self) -> None:
        super().__init__()
        self.codec.options = dict(OPUS_ENCODER_OPTIONS)


def enable_opus_fec() -> None:
    """Advertise useinbandfec=1 in offers/answers and encode with FEC. Idempotent, process-wide."""
    for codec in rtc_codecs.CODECS["audio"]:
        if codec.mimeType.lower() == "audio/opus":
            codec.parameters.update(OPUS_FMTP)
    # get_encoder() looks the class up in aiortc.codecs' namespace at call time
    rtc_codecs.OpusEncoder = FecOpusEncoder  # type: ignore[attr-defined]


def jitter_buffer_for(target_ms: int) -> JitterBuffer:
    """A JitterBuffer that holds about `target_ms` of audio before playing.

    aiortc's JitterBuffer hands out the oldest frame only once `prefetch`
    complete frames are queued behind it, so its delay is max(1, prefetch)
    packets (its audio default, prefetch=4, is the ~80 ms measured on loopback).
    `capacity` (a power of two) is how many packets it can hold; after a lost
    packet it waits until the buffer is full before skipping the hole, and the
    delay then stays at about `capacity` packets, so it is kept small: twice
    the prefetch depth, at least 8.
    """
    prefetch = max(1, round(target_ms / PTIME_MS))
    capacity = 8
    while capacity < 2 * (prefetch + 1):
        capacity *= 2
    return JitterBuffer(capacity=capacity, prefetch=prefetch)


def set_jitter_target(receiver: RTCRtpReceiver, target_ms: int) -> None:
    """Replace an audio receiver's jitter buffer (call from on("track"), before packets flow)."""
    attr = "_RTCRtpReceiver__jitter_buffer"  # name-mangled private attribute
    if not hasattr(receiver, attr):
        log.warning("this aiortc has no %s: jitter target %d ms not applied", attr, target_ms)
        return
    setattr(receiver, attr, jitter_buffer_for(target_ms))


_TURN_CREDENTIALS = re.compile(r"^(?P<scheme>turns?):(?://)?(?P<user>[^:@/]+):(?P<password>[^@/]+)@(?P<rest>.+)$")


def ice_servers(urls: list[str]) -> list[RTCIceServer]:
    """RTCIceServers from config strings: "stun:host:port" or "turn:USER:PASSWORD@host:port?transport=udp"."""
    servers: list[RTCIceServer] = []
    for url in urls:
        m = _TURN_CREDENTIALS.match(url)
        if m:
            servers.append(RTCIceServer(urls=f"{m['scheme']}:{m['rest']}", username=m["user"], credential=m["password"]))
        else:
            servers.append(RTCIceServer(urls=url))
    return servers


def ice_servers_json(servers: list[RTCIceServer]) -> list[dict[str, Any]]:
    """The same servers in the browser's RTCConfiguration format."""
    out: list[dict[str, Any]] = []
    for s in servers:
        entry: dict[str, Any] = {"urls": s.urls}
        if s.username is not None:
            entry["username"] = s.username
            entry["credential"] = s.credential
        out.append(entry)
    return out


_original_host_addresses = aioice.ice.get_host_addresses


def _host_addresses_with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _original_host_addresses(use_ipv4, use_ipv6)
    if use_ipv4 and "127.0.0.1" not in addresses:
        addresses.append("127.0.0.1")
    return addresses


def include_loopback_candidates(enabled: bool = True) -> None:
    """Let aioice offer a 127.0.0.1 host candidate (it leaves loopback out by default).

    Needed when caller and bridge share a machine with no other interface
    (tests, a laptop demo); harmless otherwise. Process-wide.
    """
    aioice.ice.get_host_addresses = _host_addresses_with_loopback if enabled else _original_host_addresses
