"""Minimal WHIP / WHEP client on aiortc for the mediamesh end-to-end tests.

Everything stays on loopback: importing this module patches aioice so that the only host
candidate gathered is 127.0.0.1 (see shared/TESTING.md), and no STUN/TURN server is configured.

Async API (run it inside ``asyncio.run`` or ``run(...)`` below)::

    pub = await publish(f"{base}/whip/room1", token)        # synthetic VP8 video + Opus tone
    viewer = await play(f"{base}/whep/room1", token)        # recvonly video + audio, counts frames
    await viewer.wait_frames(video=60, audio=1, timeout=20)
    await viewer.close()                                    # DELETE the Location, close the pc
    await pub.close()

``publish``/``play`` POST ``application/sdp`` with ``Authorization: Bearer <jwt>`` (plus any
``headers=``), follow a ``307``/``308`` to the room's host themselves (same body, Authorization
kept), expect ``201 Created`` and a ``Location`` header (resolved against the final URL), set the
answer and wait until the PeerConnection is ``connected`` (ICE + DTLS).  ``delete(location,
token)`` sends the DELETE on its own.

Sessions that must stay up while the test's own thread blocks (Selenium, polling, subprocesses)
live on a ``BackgroundLoop``::

    bg = BackgroundLoop("aiortc")
    pub = bg.adopt(bg.run(publish(url, token), timeout=30))   # closed by bg.close()
    ...
    bg.close()                                                # DELETE + close, stop, join
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

import aioice.ice
import av
import requests
from requests.structures import CaseInsensitiveDict
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger("whipwhep")

# --------------------------------------------------------------------------------------------
# loopback-only ICE
# --------------------------------------------------------------------------------------------
_LOOPBACK = ["127.0.0.1"]


def _loopback_host_addresses(use_ipv4: bool = True, use_ipv6: bool = False) -> list[str]:
    return list(_LOOPBACK) if use_ipv4 else []


def patch_loopback() -> None:
    """Make aioice gather only 127.0.0.1 host candidates in this process (idempotent)."""
    aioice.ice.get_host_addresses = _loopback_host_addresses


patch_loopback()


def new_pc() -> RTCPeerConnection:
    """A PeerConnection without any STUN/TURN server (host candidates on loopback only)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class WhipError(RuntimeError):
    """The server answered a WHIP/WHEP request with something other than the contract."""


# --------------------------------------------------------------------------------------------
# synthetic media
# --------------------------------------------------------------------------------------------
class SyntheticVideoTrack(VideoStreamTrack):
    """A moving gradient with a bouncing bar, ``fps`` frames a second, yuv420p."""

    def __init__(self, width: int = 320, height: int = 240, fps: int = 30, period: int = 60):
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self.frames_sent = 0
        # pre-render ``period`` distinct frames' planes (cheap to cycle, keeps CPU low)
        self._planes = []
        w, h = width, height
        for i in range(period):
            bar = (i * w // period) % w
            row = bytearray((x * 255 // max(w - 1, 1) + i * 4) & 0xFF for x in range(w))
            for x in range(bar, min(bar + w // 10, w)):
                row[x] = 235
            y = bytes(row) * h
            u = bytes([(64 + i * 2) & 0xFF]) * ((w // 2) * (h // 2))
            v = bytes([(192 - i * 2) & 0xFF]) * ((w // 2) * (h // 2))
            self._planes.append((y, u, v))

    async def next_timestamp(self):
        # like VideoStreamTrack.next_timestamp but at our own frame rate
        clock = 90000
        if getattr(self, "_start", None) is not None:
            self._timestamp += int(clock / self.fps)
            wait = self._start + (self._timestamp / clock) - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
        else:
            self._start = time.time()
            self._timestamp = 0
        return self._timestamp, fractions.Fraction(1, clock)

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        y, u, v = self._planes[self.frames_sent % len(self._planes)]
        for i, (plane, data) in enumerate(zip(frame.planes, (y, u, v))):
            _fill_plane(plane, data, self.width if i == 0 else self.width // 2)
        frame.pts, frame.time_base = pts, time_base
        self.frames_sent += 1
        return frame


def _fill_plane(plane, data: bytes, width: int) -> None:
    stride = plane.line_size
    if stride == width:
        plane.update(data)
        return
    rows = len(data) // width
    buf = bytearray(stride * rows)
    for r in range(rows):
        buf[r * stride : r * stride + width] = data[r * width : (r + 1) * width]
    plane.update(bytes(buf))


class ToneAudioTrack(MediaStreamTrack):
    """A 400 Hz sine tone, 48 kHz mono s16, 20 ms frames (Opus-friendly)."""

    kind = "audio"

    def __init__(self, freq: int = 400, rate: int = 48000, ptime: float = 0.020):
        super().__init__()
        self.rate = rate
        self.samples = int(rate * ptime)
        self.frames_sent = 0
        # an integral number of periods per frame when rate*ptime is a multiple of rate/freq
        self._pcm = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * n / rate)))
            for n in range(self.samples)
        )
        self._start: Optional[float] = None
        self._timestamp = 0

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
            self._timestamp = 0
        else:
            self._timestamp += self.samples
            wait = self._start + (self._timestamp / self.rate) - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
        frame = av.AudioFrame(format="s16", layout="mono", samples=self.samples)
        frame.planes[0].update(self._pcm)
        frame.pts = self._timestamp
        frame.sample_rate = self.rate
        frame.time_base = fractions.Fraction(1, self.rate)
        self.frames_sent += 1
        return frame


def prefer_codec(transceiver, mime: str) -> None:
    """Restrict a transceiver to one codec (e.g. ``video/VP8``), keeping its RTX."""
    kind = mime.split("/")[0]
    caps = RTCRtpSender.getCapabilities(kind).codecs
    chosen = [c for c in caps if c.mimeType.lower() == mime.lower()]
    if not chosen:
        raise ValueError(f"aiortc has no codec {mime}")
    rtx = [c for c in caps if c.mimeType.lower() == f"{kind}/rtx"]
    transceiver.setCodecPreferences(chosen + rtx)


# --------------------------------------------------------------------------------------------
# receiving side: count decoded frames
# --------------------------------------------------------------------------------------------
@dataclass
class FrameCounter:
    """Attach to a PeerConnection's ``track`` event; counts frames returned by ``recv()``.

    For video, ``recv()`` returns *decoded* frames (aiortc decodes in the receiver), so
    ``video`` is the number of decoded video frames and ``video_size`` the last (w, h).
    """

    video: int = 0
    audio: int = 0
    video_size: Optional[tuple[int, int]] = None
    first_video_at: Optional[float] = None
    first_audio_at: Optional[float] = None
    tasks: list = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def attach(self, pc: RTCPeerConnection) -> None:
        @pc.on("track")
        def _on_track(track):
            self.tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except (MediaStreamError, asyncio.CancelledError):
                return
            except Exception:  # decoder hiccup: keep counting what does decode
                log.exception("recv on %s track failed", track.kind)
                return
            now = time.monotonic()
            if track.kind == "video":
                self.video += 1
                self.video_size = (frame.width, frame.height)
                self.first_video_at = self.first_video_at or now
            else:
                self.audio += 1
                self.first_audio_at = self.first_audio_at or now
            self.changed.set()

    async def wait(self, video: int = 0, audio: int = 0, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.video < video or self.audio < audio:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"wanted >= {video} video / {audio} audio frames in {timeout}s, "
                    f"got {self.video} video / {self.audio} audio"
                )
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        for t in self.tasks:
            t.cancel()


async def wait_connected(pc: RTCPeerConnection, timeout: float = 15.0) -> None:
    """Wait until ICE + DTLS are up (connectionState == 'connected'), or raise."""
    deadline = time.monotonic() + timeout
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed"):
            raise ConnectionError(f"peer connection {pc.connectionState}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"not connected after {timeout}s (connection={pc.connectionState}, "
                f"ice={pc.iceConnectionState})"
            )
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------------
# WHIP / WHEP signalling
# --------------------------------------------------------------------------------------------
def _headers(token: Optional[str], content_type: Optional[str] = None) -> dict:
    h = {}
    if token:
        h["Authorization"] = f"Bearer {token}"
    if content_type:
        h["Content-Type"] = content_type
    return h


MAX_REDIRECTS = 3


async def post_offer(
    url: str,
    token: Optional[str],
    sdp: str,
    timeout: float = 10.0,
    *,
    headers: Optional[dict] = None,
    max_redirects: int = MAX_REDIRECTS,
):
    """POST an SDP offer; return (answer_sdp, absolute_location, response).

    ``headers`` are merged into the request (over Authorization / Content-Type).  A ``307`` or
    ``308`` (a node that does not host the room points at the one that does) is followed here, at
    most ``max_redirects`` hops, with the same method, body and headers: ``requests`` would drop
    Authorization on a redirect to another port.  The ``Location`` of the final 201 is resolved
    against the URL that answered it; ``response.url`` is that URL and ``response.history`` holds
    the redirects.
    """
    hdrs = CaseInsensitiveDict(_headers(token, "application/sdp"))
    hdrs.update(headers or {})
    history = []
    while True:
        resp = await asyncio.to_thread(
            requests.post, url, data=sdp.encode(), headers=hdrs, timeout=timeout,
            allow_redirects=False,
        )
        if resp.status_code not in (307, 308):
            break
        target = resp.headers.get("Location")
        if not target:
            raise WhipError(f"POST {url} -> {resp.status_code} without a Location header")
        if len(history) >= max_redirects:
            raise WhipError(f"POST {url} -> {resp.status_code}: more than {max_redirects} redirects "
                            f"({' -> '.join(r.url for r in history + [resp])} -> {target})")
        history.append(resp)
        url = urllib.parse.urljoin(url, target)
    resp.history = history
    if resp.status_code != 201:
        raise WhipError(f"POST {url} -> {resp.status_code} (want 201): {resp.text[:500]}")
    loc = resp.headers.get("Location")
    if not loc:
        raise WhipError(f"POST {url} -> 201 without a Location header")
    ctype = resp.headers.get("Content-Type", "")
    if "application/sdp" not in ctype:
        raise WhipError(f"POST {url} -> Content-Type {ctype!r}, want application/sdp")
    return resp.text, urllib.parse.urljoin(url, loc), resp


async def delete(location: str, token: Optional[str] = None, timeout: float = 10.0) -> int:
    """DELETE a WHIP/WHEP session resource; returns the HTTP status."""
    resp = await asyncio.to_thread(
        requests.delete, location, headers=_headers(token), timeout=timeout
    )
    return resp.status_code


@dataclass
class Session:
    pc: RTCPeerConnection
    url: str
    token: Optional[str]
    location: Optional[str] = None
    answer: Optional[str] = None
    response_headers: dict = field(default_factory=dict)
    counter: Optional[FrameCounter] = None  # WHEP viewers
    video_track: Optional[SyntheticVideoTrack] = None  # WHIP publishers
    audio_track: Optional[ToneAudioTrack] = None
    connect_seconds: Optional[float] = None
    deleted_status: Optional[int] = None

    async def wait_frames(self, video: int = 0, audio: int = 0, timeout: float = 20.0):
        assert self.counter is not None, "not a viewer"
        await self.counter.wait(video, audio, timeout)

    async def close(self, delete_resource: bool = True) -> Optional[int]:
        """DELETE the Location (if any) and close the PeerConnection. Returns DELETE's status."""
        status = None
        try:
            if delete_resource and self.location and self.deleted_status is None:
                status = self.deleted_status = await delete(self.location, self.token)
        finally:
            if self.counter:
                self.counter.stop()
            await self.pc.close()
        return status


async def _negotiate(pc, url, token, connect_timeout, counter=None, *, headers=None) -> Session:
    t0 = time.monotonic()
    await pc.setLocalDescription(await pc.createOffer())  # waits for ICE gathering (no trickle)
    session = Session(pc=pc, url=url, token=token, counter=counter)
    try:
        answer, location, resp = await post_offer(url, token, pc.localDescription.sdp,
                                                  headers=headers)
        session.location, session.answer = location, answer
        session.response_headers = dict(resp.headers)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(pc, connect_timeout)
    except BaseException:
        await session.close()
        raise
    session.connect_seconds = time.monotonic() - t0
    return session


async def publish(
    url: str,
    token: Optional[str],
    *,
    video: bool = True,
    audio: bool = True,
    width: int = 320,
    height: int = 240,
    fps: int = 30,
    video_codec: str = "video/VP8",
    connect_timeout: float = 15.0,
    headers: Optional[dict] = None,
) -> Session:
    """WHIP-publish a synthetic video track (VP8 unless ``video_codec`` says otherwise) and an
    Opus tone; returns when connected.  ``headers`` go into the POST (see ``post_offer``)."""
    pc = new_pc()
    vtrack = atrack = None
    if video:
        vtrack = SyntheticVideoTrack(width, height, fps)
        prefer_codec(pc.addTransceiver(vtrack, direction="sendonly"), video_codec)
    if audio:
        atrack = ToneAudioTrack()
        prefer_codec(pc.addTransceiver(atrack, direction="sendonly"), "audio/opus")
    session = await _negotiate(pc, url, token, connect_timeout, headers=headers)
    session.video_track, session.audio_track = vtrack, atrack
    return session


def with_layer(url: str, layer: Optional[str]) -> str:
    if not layer:
        return url
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}layer={urllib.parse.quote(layer)}"


async def play(
    url: str,
    token: Optional[str],
    layer: Optional[str] = None,
    *,
    video: bool = True,
    audio: bool = True,
    connect_timeout: float = 15.0,
    headers: Optional[dict] = None,
) -> Session:
    """WHEP-play: offer recvonly video + audio, count decoded frames; returns when connected.
    ``headers`` go into the POST (see ``post_offer``)."""
    pc = new_pc()
    counter = FrameCounter()
    counter.attach(pc)
    if video:
        pc.addTransceiver("video", direction="recvonly")
    if audio:
        pc.addTransceiver("audio", direction="recvonly")
    return await _negotiate(pc, with_layer(url, layer), token, connect_timeout, counter,
                            headers=headers)


def run(coro, timeout: float = 120.0):
    """Run a coroutine to completion in a fresh event loop, with an overall deadline."""

    async def _bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(_bounded())


# --------------------------------------------------------------------------------------------
# sessions on a background event loop
# --------------------------------------------------------------------------------------------
class BackgroundLoop:
    """An asyncio event loop on a daemon thread, for aiortc sessions that must stay up while
    the calling thread blocks (Selenium, HTTP polling, subprocesses).

    ``run(coro, timeout)`` runs a coroutine on the loop and returns its result (or raises its
    exception) in the caller's thread.  ``adopt(session)`` hands a Session over to ``close()``,
    which closes the adopted sessions, last first (DELETE + pc.close, each within its timeout;
    a failure is printed, not raised), cancels whatever is left on the loop, stops it and joins
    the thread.  With ``max_seconds`` the loop does the same by itself that long after it
    started (``error`` then says so and ``alive()`` is false), so a session left behind cannot
    outlive its test.
    """

    class Deadline(TimeoutError):
        """``run``'s own timeout expired (as opposed to a TimeoutError of the coroutine)."""

    def __init__(self, name: str = "aiortc", max_seconds: Optional[float] = None):
        self.name = name
        self.error: Optional[BaseException] = None
        self.closed: list = []  # what each adopted session's close() returned (DELETE status)
        self._sessions: list = []
        self.loop = asyncio.new_event_loop()
        if max_seconds is not None:
            self.loop.call_later(max_seconds, self._expire, max_seconds)
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        """Run ``coro`` on the loop, cancelled after ``timeout`` s (``Deadline``); block for it."""
        if not self.thread.is_alive():
            coro.close()
            raise RuntimeError(f"{self.name}: the event loop is not running ({self.error!r})")

        async def bounded():
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    return await coro
            except TimeoutError as e:
                if deadline.expired():
                    raise BackgroundLoop.Deadline(f"{self.name}: not done within {timeout}s") from e
                raise

        fut = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        try:
            return fut.result(timeout + 5)
        except TimeoutError:
            if fut.done():  # the coroutine's own TimeoutError
                raise
            fut.cancel()
            raise BackgroundLoop.Deadline(
                f"{self.name}: the event loop did not answer within {timeout + 5}s") from None

    def adopt(self, session: Session) -> Session:
        """Have ``close()`` close ``session`` (last adopted first); returns it.  Any thread."""
        self._sessions.append(session)
        return session

    def alive(self) -> bool:
        """The loop is running: not closed, ``max_seconds`` not reached."""
        return self.thread.is_alive() and self.error is None

    async def _shutdown(self, timeout: float) -> None:
        while self._sessions:
            s = self._sessions.pop()
            try:
                self.closed.append(await asyncio.wait_for(s.close(), timeout))
            except Exception as e:  # the node may have moved or closed it already
                print(f"[e2e] closing {s.location}: {e!r}")
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        if rest:
            await asyncio.wait(rest, timeout=5)
        await self.loop.shutdown_asyncgens()

    def _expire(self, max_seconds: float) -> None:
        self.error = TimeoutError(f"{self.name}: closed after max_seconds={max_seconds}")

        async def shutdown_and_stop():
            try:
                await self._shutdown(10.0)
            finally:
                self.loop.stop()

        self._expiry = self.loop.create_task(shutdown_and_stop())

    def close(self, timeout: float = 10.0) -> list:
        """Close the adopted sessions (each within ``timeout`` s), stop the loop and join the
        thread (5 s).  Idempotent; returns ``closed``."""
        if self.thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self.loop).result(
                    timeout * (len(self._sessions) + 1) + 10)
            except Exception as e:
                print(f"[e2e] {self.name}: shutdown: {e!r}")
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(5)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
        return self.closed
