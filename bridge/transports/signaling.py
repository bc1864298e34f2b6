"""HTTP side of the direct WebRTC transport (aiohttp): signaling API, page, health.

- POST /v1/offer  (Authorization: Bearer <token>)
      body   {"sdp": str, "type": "offer", "session_id"?: str, "pools"?: {stage: pool}}
      200    {"sdp": str, "type": "answer", "session_id": str, "ice_servers": [...]}
      400 bad body/offer, 401 no or wrong token, 408 body too slow, 409 session id used before,
      429 too many offers from this address, 503 bridge full / too many calls connecting /
      a default pool too far behind (with Retry-After); errors are JSON {"error": code, "message": text}.
- GET /v1/config  (bearer) -> {"ice_servers": [...], "jitter_target_ms": int}
- GET /healthz    -> {"ok": true, "sessions": n, "max_sessions": m}
- GET /metrics    (bearer) -> Prometheus text (or `voxbus bridge --metrics-port`, loopback by default)
- GET /           -> the caller page; GET /static/* -> its scripts and styles.
"""

from __future__ import annotations

import hmac
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from shared import metrics

from . import rtc_setup
from .http_guard import add_security_headers, client_address, read_body

if TYPE_CHECKING:
    from .webrtc import WebRtcTransport

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MAX_BODY_BYTES = 256 * 1024
MAX_SDP_CHARS = 64 * 1024
TRANSPORT_KEY: web.AppKey[WebRtcTransport] = web.AppKey("voxbus_webrtc_transport")


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def authorized(request: web.Request, token: str) -> bool:
    """Timing-safe bearer check on bytes: any header (non-UTF-8 included) is a yes or a no, never an error."""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode())


def _unauthorized() -> web.Response:
    return error(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                 {"WWW-Authenticate": 'Bearer realm="voxbus"'})


async def offer(request: web.Request) -> web.Response:
    from .webrtc import OfferError

    transport = request.app[TRANSPORT_KEY]
    wait_s = transport.offer_limiter.allow(client_address(request))
    if wait_s > 0:
        metrics.HTTP_REFUSED.labels("offer_rate").inc()
        return error(429, "too_many_offers", "too many offers from this address; slow down",
                     {"Retry-After": str(max(1, math.ceil(wait_s)))})
    if not authorized(request, transport.token):
        return _unauthorized()
    try:
        raw = await read_body(request, transport.cfg.http_body_timeout_s)
    except TimeoutError:
        metrics.HTTP_REFUSED.labels("body_timeout").inc()
        return error(408, "body_timeout", f"the body did not arrive within {transport.cfg.http_body_timeout_s:g} s")
    try:
        body: Any = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than a parser goes
        return error(400, "bad_json", "the body must be a JSON object")
    if not isinstance(body, dict):
        return error(400, "bad_json", "the body must be a JSON object")
    sdp, kind, sid, pools = body.get("sdp"), body.get("type"), body.get("session_id"), body.get("pools")
    if not isinstance(sdp, str) or not sdp.strip() or len(sdp) > MAX_SDP_CHARS:
        return error(400, "bad_request", f"'sdp' must be a non-empty string of at most {MAX_SDP_CHARS} characters")
    if kind != "offer":
        return error(400, "bad_request", "'type' must be \"offer\"")
    if sid is not None and not isinstance(sid, str):
        return error(400, "bad_request", "'session_id' must be a string")
    if pools is not None and not (isinstance(pools, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in pools.items())):
        return error(400, "bad_request", "'pools' must map stage names to pool names")
    try:
        call, answer = await transport.accept_offer(sdp, sid, pools)
    except OfferError as exc:
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        return error(exc.status, exc.error, exc.message, headers)
    return web.json_response({"sdp": answer, "type": "answer", "session_id": call.id,
                              "ice_servers": rtc_setup.ice_servers_json(transport.ice_servers)})


async def client_config(request: web.Request) -> web.Response:
    transport = request.app[TRANSPORT_KEY]
    if not authorized(request, transport.token):
        return _unauthorized()
    return web.json_response({"ice_servers": rtc_setup.ice_servers_json(transport.ice_servers),
                              "jitter_target_ms": transport.cfg.jitter_target_ms})


async def healthz(request: web.Request) -> web.Response:
    bridge = request.app[TRANSPORT_KEY].bridge
    return web.json_response({"ok": bridge.started.is_set(), "sessions": len(bridge.sessions),
                              "max_sessions": bridge.config.bridge.max_sessions})


async def prometheus_metrics(request: web.Request) -> web.Response:
    """The bridge process's Prometheus metrics (sessions, barge-ins, voice-to-voice, ...), behind the token:
    scrape them from `--metrics-port` instead (loopback by default), or send the bearer token."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if not authorized(request, request.app[TRANSPORT_KEY].token):
        return _unauthorized()
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


def build_app(transport: WebRtcTransport) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(add_security_headers)
    app[TRANSPORT_KEY] = transport
    app.router.add_post("/v1/offer", offer)
    app.router.add_get("/v1/config", client_config)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", prometheus_metrics)
    app.router.add_get("/", page)
    app.router.add_static("/static/", WEB_DIR, show_index=False, follow_symlinks=False)
    return app
