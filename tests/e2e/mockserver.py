"""A tiny WHIP/WHEP endpoint backed by aiortc, used only to validate the harness itself.

It speaks the same HTTP contract the mediamesh node does (POST application/sdp -> 201 +
relative Location + SDP answer, DELETE the Location, CORS preflight with Location exposed), so
the page in pages/ and whipwhep.py can be checked against a known-good peer without the server:

* ``POST /whip/{room}``: answers, decodes what the publisher sends (``publishers[sid].counter``)
* ``POST /whep/{room}``: answers with a synthetic VP8 video track and an Opus tone
* ``DELETE /whip|whep/{room}/{sid}``: closes that peer connection
* ``GET /healthz``, ``/metrics`` (mediamesh_webrtc_active_connections), ``/admin/v1/rooms[/{room}]``

Used by the harness self-check to validate the client side without the node.

The HTTP server runs in a thread, aiortc in its own event-loop thread.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import uuid
from typing import Optional

from aiortc import RTCSessionDescription

import whipwhep as ww

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, ETag, Link",
}


class MockWhipWhep:
    def __init__(self, token: Optional[str] = None, port: int = 0, node_id: str = "mock"):
        self.token = token
        self.node_id = node_id
        self.publishers: dict[str, dict] = {}
        self.viewers: dict[str, dict] = {}
        self.preflights = 0
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._http_thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def start(self) -> "MockWhipWhep":
        self._loop_thread.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

        async def _close_all():
            for d in list(self.publishers.values()) + list(self.viewers.values()):
                if d.get("counter"):
                    d["counter"].stop()
                await d["pc"].close()

        try:
            asyncio.run_coroutine_threadsafe(_close_all(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(5)

    def rooms(self) -> dict:
        out: dict = {}
        for kind, table in (("publishers", self.publishers), ("subscribers", self.viewers)):
            for sid, e in list(table.items()):
                r = out.setdefault(e["room"], {"room": e["room"], "node": self.node_id, "epoch": 1,
                                               "publishers": [], "subscribers": []})
                r[kind].append({"session": sid})
        return out

    def call(self, coro, timeout: float = 15.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # ---- aiortc side --------------------------------------------------------------------------
    async def _answer(self, kind: str, offer: str, room: str = "") -> tuple[str, str]:
        pc = ww.new_pc()
        sid = uuid.uuid4().hex[:12]
        entry = {"pc": pc, "room": room}
        if kind == "whip":
            counter = ww.FrameCounter()
            counter.attach(pc)
            entry["counter"] = counter
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        if kind == "whep":
            for t in pc.getTransceivers():
                if t.kind == "video":
                    pc.addTrack(ww.SyntheticVideoTrack())
                elif t.kind == "audio":
                    pc.addTrack(ww.ToneAudioTrack())
        await pc.setLocalDescription(await pc.createAnswer())
        (self.publishers if kind == "whip" else self.viewers)[sid] = entry
        return sid, pc.localDescription.sdp

    async def _close(self, kind: str, sid: str) -> bool:
        entry = (self.publishers if kind == "whip" else self.viewers).pop(sid, None)
        if entry is None:
            return False
        if entry.get("counter"):
            entry["counter"].stop()
        await entry["pc"].close()
        return True

    # ---- HTTP side ----------------------------------------------------------------------------
    def _handler(self):
        mock = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", headers=None):
                self.send_response(status)
                for k, v in {**CORS, **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def _authorized(self):
                if mock.token is None:
                    return True
                auth = self.headers.get("Authorization", "")
                if callable(mock.token):
                    return mock.token(auth.removeprefix("Bearer "))
                return auth == f"Bearer {mock.token}"

            def _parts(self):
                return [p for p in self.path.split("?")[0].split("/") if p]

            def do_OPTIONS(self):
                mock.preflights += 1
                self._send(204)

            def do_POST(self):
                parts = self._parts()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if len(parts) != 2 or parts[0] not in ("whip", "whep"):
                    return self._send(404)
                if not self._authorized():
                    return self._send(401)
                if "application/sdp" not in self.headers.get("Content-Type", ""):
                    return self._send(415)
                sid, answer = mock.call(mock._answer(parts[0], body.decode(), parts[1]))
                self._send(201, answer.encode(), {
                    "Content-Type": "application/sdp",
                    "Location": f"/{parts[0]}/{parts[1]}/{sid}",
                })

            def do_GET(self):
                parts = self._parts()
                if parts == ["healthz"]:
                    return self._send(200, b"ok")
                if parts == ["metrics"]:
                    n = len(mock.publishers) + len(mock.viewers)
                    text = ("# TYPE mediamesh_webrtc_active_connections gauge\n"
                            f"mediamesh_webrtc_active_connections {n}\n")
                    return self._send(200, text.encode(), {"Content-Type": "text/plain"})
                if parts[:3] == ["admin", "v1", "rooms"]:
                    if not self._authorized():
                        return self._send(401)
                    rooms = mock.rooms()
                    if len(parts) == 3:
                        return self._json({"rooms": list(rooms.values())})
                    if len(parts) == 4 and parts[3] in rooms:
                        return self._json(rooms[parts[3]])
                return self._send(404)

            def _json(self, obj):
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def do_DELETE(self):
                parts = self._parts()
                if len(parts) != 3 or parts[0] not in ("whip", "whep"):
                    return self._send(404)
                if not self._authorized():
                    return self._send(401)
                ok = mock.call(mock._close(parts[0], parts[2]))
                self._send(200 if ok else 404)

        return Handler
