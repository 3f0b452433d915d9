"""The browser SDK (sdk/js/mediamesh.js, served by the node at /sdk/mediamesh.js) against a real
node, in headless Chromium: the page tests/e2e/pages/sdk.html, served from another origin, imports
the SDK from the node and exposes window.sdkmm.*.

1. acceptance: the SDK publishes the fake camera over WebSocket signaling and the node's own
   load generator (`mediamesh loadtest`, the Rust SDK) watches it over WebSocket
2. an SDK viewer watches an SDK publisher: frames decode, set_layer is acknowledged, mute stops
   frames and unmute brings them back, a dropped socket resumes the same session
3. protocol errors as a browser sees them on a raw WebSocket (and a refused join, and the
   SDK's WHIP/WHEP helpers)
4. the node serves the SDK and the demo page; the demo publishes and plays without console errors
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from urllib.parse import quote

import pytest
import requests

from conftest import Browser, _start_chromium, wait_until

pytestmark = pytest.mark.timeout(120)


class SdkBrowser(Browser):
    """Chromium with pages/sdk.html loaded; ``call`` runs ``await window.sdkmm.<fn>(...args)``."""

    NAMESPACE = "sdkmm"

    def open_page(self):
        self.driver.get(self.page_url)
        state = wait_until(
            lambda: self.driver.execute_script(
                "return window.mmReady === true ? 'ready' : (window.mmError || null)"),
            15, what="sdk.html to import the SDK from the node")
        if state != "ready":
            raise RuntimeError(f"sdk.html could not load the SDK: {state}\n--- console ---\n{self.console()}")


@pytest.fixture(scope="module")
def sdk_browser(node, page_server, tmp_path_factory):
    """Headless Chromium with sdk.html (page server origin) importing the SDK from the node."""
    udd = tmp_path_factory.mktemp("chromium-sdk-profile")
    driver = _start_chromium(udd)
    b = SdkBrowser(driver, f"{page_server}/sdk.html?node={quote(node.base, safe='')}")
    try:
        b.open_page()
        yield b
    finally:
        driver.quit()
        shutil.rmtree(udd, ignore_errors=True)


def _video(stats: dict, side: str) -> dict:
    return ((stats or {}).get(side) or {}).get("video") or {}


def _frames(b: SdkBrowser, client_id: str) -> int:
    return _video(b.call("stats", client_id), "subscriber").get("framesDecoded") or 0


def _events(b: SdkBrowser, client_id: str, name: str) -> list:
    return [e["data"] for e in b.call("events", client_id) if e["event"] == name]


def _publish(b: SdkBrowser, node, room: str, identity: str) -> str:
    """An SDK client in `room` (role publisher) sending the fake camera; returns its id."""
    token = node.token(room, identity, publish=True)
    c = b.call("connect", token, {"room": room, "role": "publisher", "displayName": identity})
    info = b.call("publish", c["id"], {"width": 640, "height": 480})
    assert "video" in info["kinds"], info

    def encoding():
        v = _video(b.call("stats", c["id"]), "publisher")
        return v if (v.get("framesSent") or 0) > 0 else None

    wait_until(encoding, 10, 0.3, "the SDK publisher to send frames")
    print(f"[sdk] publisher {c['session']} in {room}: capture {info['captureWidth']}x{info['captureHeight']}"
          f" @ {info['frameRate']} fps")
    return c["id"]


# ------------------------------------------------------------------------------------------------
# 1. acceptance: browser SDK publishes over WebSocket signaling, the Rust SDK (loadtest) watches
# ------------------------------------------------------------------------------------------------
def test_sdk_publishes_and_rust_viewer_receives(node, sdk_browser):
    b = sdk_browser
    room = "sdk-accept"
    t0 = time.monotonic()
    pub = _publish(b, node, room, "sdk-publisher")
    try:
        cmd = [str(node.binary), "loadtest", "--url", node.base, "--room", room,
               "--publishers", "0", "--subscribers", "1", "--mode", "ws", "--duration", "6s",
               "--api-secret", node.secret, "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        lines = [l for l in r.stdout.strip().splitlines() if l.strip()]
        assert r.returncode == 0 and lines, (
            f"`{' '.join(cmd)}` exited {r.returncode}\n--- stdout ---\n{r.stdout[-2000:]}\n"
            f"--- stderr ---\n{r.stderr[-4000:]}")
        try:
            result = json.loads(lines[-1])
        except ValueError as e:
            raise AssertionError(f"loadtest's last stdout line is not JSON: {lines[-1]!r}\n"
                                 f"--- stderr ---\n{r.stderr[-4000:]}") from e
        print(f"[sdk] loadtest: {result}")
        published = _video(b.call("stats", pub), "publisher")
        why = f"loadtest {result}; SDK publisher {published}\n--- loadtest stderr ---\n{r.stderr[-4000:]}"
        assert result["subscribers_connected"] == 1, why
        # Chromium's fake camera runs at 20 fps: 6 s minus the connect time is ~100 frames
        assert result["frames"] > 30, why
        assert result["bytes"] > 0, why
        assert result["loss"] <= 0.05, why
    finally:
        b.call("close", pub)
    print(f"[sdk] acceptance: {time.monotonic() - t0:.1f}s")


# ------------------------------------------------------------------------------------------------
# 2. SDK viewer watches an SDK publisher: frames, layer, mute/unmute, resume
# ------------------------------------------------------------------------------------------------
def test_sdk_viewer_watches_mutes_and_resumes(node, sdk_browser):
    b = sdk_browser
    room = "sdk-watch"
    t0 = time.monotonic()
    viewer_token = node.token(room, "sdk-viewer", subscribe=True)
    viewer = b.call("connect", viewer_token, {"room": room, "role": "subscriber",
                                              "reportPositionMs": 1000, "pingIntervalMs": 1000})
    ids = [viewer["id"]]
    try:
        assert viewer["joined"]["idle_timeout_ms"] > 0 and viewer["joined"]["resume_token"], viewer
        pub = _publish(b, node, room, "sdk-publisher-2")
        ids.append(pub)
        # the viewer joined first: the publisher's tracks arrive as events
        published = wait_until(lambda: [t for t in _events(b, viewer["id"], "track_published")
                                        if t["kind"] == "video"], 10, 0.3, "track_published (video)")
        video_track = published[0]
        assert video_track["codec"].lower() == "video/vp8" and "/" in video_track["id"], video_track
        assert any(t["id"] == video_track["id"] for t in b.call("tracks", viewer["id"]))

        stream = b.call("subscribe", viewer["id"])
        assert sorted(t["kind"] for t in stream["tracks"]) == ["audio", "video"], stream
        wait_until(lambda: _frames(b, viewer["id"]) > 5, 20, 0.3, "viewer framesDecoded > 5")

        # set_layer is acknowledged (no simulcast here: frames keep coming)
        b.call("setLayer", viewer["id"], "low")
        f0 = _frames(b, viewer["id"])
        wait_until(lambda: _frames(b, viewer["id"]) > f0 + 5, 10, 0.3, "frames after set_layer low")
        b.call("setLayer", viewer["id"], "high")

        # mute: viewers are told, and the node stops forwarding (the publisher keeps sending here,
        # so this checks the node, not the browser)
        sent0 = _video(b.call("stats", pub), "publisher").get("framesSent") or 0
        b.call("mute", pub, "video", True, {"pauseSending": False})
        wait_until(lambda: [m for m in _events(b, viewer["id"], "track_muted")
                            if m["track_id"] == video_track["id"] and m["muted"]], 5, 0.2, "track_muted true")
        time.sleep(1.5)
        f1 = _frames(b, viewer["id"])
        time.sleep(2.0)
        f2 = _frames(b, viewer["id"])
        assert f2 <= f1 + 2, f"frames kept coming while muted: {f1} -> {f2}"

        sent1 = _video(b.call("stats", pub), "publisher").get("framesSent") or 0
        assert sent1 > sent0 + 20, f"the publisher stopped sending ({sent0} -> {sent1}): pauseSending: false"

        # unmute: frames again
        b.call("mute", pub, "video", False, {"pauseSending": False})
        wait_until(lambda: [m for m in _events(b, viewer["id"], "track_muted")
                            if m["track_id"] == video_track["id"] and not m["muted"]], 5, 0.2, "track_muted false")
        wait_until(lambda: _frames(b, viewer["id"]) > f2 + 10, 10, 0.3, "frames after unmute")

        # the SDK's default mute also stops sending: no audio packets leave the browser
        b.call("mute", pub, "audio", True)
        wait_until(lambda: [m for m in _events(b, viewer["id"], "track_muted") if m["muted"]
                            and m["track_id"] != video_track["id"]], 5, 0.2, "track_muted true (audio)")
        a1 = (b.call("stats", pub)["publisher"]["audio"] or {}).get("packetsSent")
        time.sleep(1.0)
        a2 = (b.call("stats", pub)["publisher"]["audio"] or {}).get("packetsSent")
        assert a1 is not None and a2 <= a1 + 1, f"audio packets sent while muted: {a1} -> {a2}"
        b.call("mute", pub, "audio", False)
        wait_until(lambda: (b.call("stats", pub)["publisher"]["audio"] or {}).get("packetsSent", 0) > a2 + 10,
                   5, 0.2, "audio packets after unmute")

        # resume: the viewer's socket drops; it comes back to the same session and plays on
        session = b.call("info", viewer["id"])["session"]
        b.call("drop", viewer["id"])
        reconnected = wait_until(lambda: _events(b, viewer["id"], "reconnected"), 15, 0.3, "reconnected")[0]
        assert reconnected["resumed"] is True and reconnected["session"] == session, reconnected
        assert reconnected["error"] is None, reconnected
        f3 = _frames(b, viewer["id"])
        wait_until(lambda: _frames(b, viewer["id"]) > f3 + 10, 15, 0.3, "frames after resume")

        stats = b.call("stats", viewer["id"])
        video = _video(stats, "subscriber")
        print(f"[sdk] viewer: {video}; reconnects={stats['reconnects']} resumes={stats['resumes']}")
        assert stats["resumes"] == 1, stats
        assert stats["rttMs"] is not None and stats["state"] == "joined", stats  # pings got pongs
        assert video["loss"] <= 0.05, video
        # the mute (3.5 s) is the largest gap; the resume must not be much worse
        assert 3000 <= video["largestFrameGapMs"] < 10000, video
    finally:
        for i in reversed(ids):
            b.call("close", i)
    print(f"[sdk] viewer test: {time.monotonic() - t0:.1f}s")


# ------------------------------------------------------------------------------------------------
# 3. protocol errors on a raw WebSocket
# ------------------------------------------------------------------------------------------------
def _recv(b: SdkBrowser, rid: str, what: str) -> dict:
    item = b.call("rawRecv", rid, 5000)
    assert "message" in item and item["message"] is not None, f"expected {what}, got {item}"
    return item["message"]


def test_protocol_errors_on_a_raw_socket(node, sdk_browser):
    b = sdk_browser
    room = "sdk-raw"
    token = node.token(room, "raw-viewer", subscribe=True)
    rid = b.call("rawOpen", token)
    try:
        # (a) an answer before join
        b.call("rawSend", rid, '{"answer":{"target":"subscriber","sdp":"v=0"}}')
        m = _recv(b, rid, "error not_joined")
        assert m.get("error", {}).get("code") == "not_joined", m
        assert not m.get("id"), m

        # (b) not JSON
        b.call("rawSend", rid, "{not json")
        m = _recv(b, rid, "error bad_request")
        assert m.get("error", {}).get("code") == "bad_request", m

        # an unknown message type
        b.call("rawSend", rid, '{"id":4,"dance":{}}')
        m = _recv(b, rid, "error unknown_message")
        assert m.get("id") == 4 and m.get("error", {}).get("code") == "unknown_message", m

        # join works after all that
        b.call("rawSend", rid, {"id": 1, "join": {"room": room, "role": "subscriber", "display_name": "raw"}})
        m = _recv(b, rid, "joined")
        assert m.get("id") == 1 and m.get("joined", {}).get("session"), m
        assert m["joined"]["resumed"] is False, m

        # (c) an answer after join, nothing offered: out of order, with the request's id
        b.call("rawSend", rid, '{"id":9,"answer":{"target":"subscriber","sdp":"v=0"}}')
        m = _recv(b, rid, "error out_of_order")
        assert m.get("id") == 9 and m.get("error", {}).get("code") == "out_of_order", m
        assert not m["error"].get("fatal"), m

        # a second join
        b.call("rawSend", rid, {"id": 10, "join": {"room": room, "role": "subscriber"}})
        m = _recv(b, rid, "error already_joined")
        assert m.get("id") == 10 and m.get("error", {}).get("code") == "already_joined", m

        # the session is still there
        b.call("rawSend", rid, {"ping": {"timestamp_ms": 1234}})
        m = _recv(b, rid, "pong")
        assert m.get("pong", {}).get("timestamp_ms") == 1234, m

        # leave: the node closes the socket normally
        b.call("rawSend", rid, {"leave": {}})
        item = b.call("rawRecv", rid, 5000)
        assert "closed" in item and item["closed"]["code"] == 1000, item
    finally:
        b.call("rawClose", rid)


def test_bad_token_is_refused(node, sdk_browser):
    """A publisher join with a viewer-only token is refused with forbidden; the SDK says so."""
    b = sdk_browser
    token = node.token("sdk-forbidden", "viewer-only", subscribe=True)
    with pytest.raises(RuntimeError) as e:
        b.call("connect", token, {"room": "sdk-forbidden", "role": "publisher"})
    assert "forbidden" in str(e.value), e.value


def test_sdk_whip_whep_helpers(node, sdk_browser):
    """whipPublish / whepPlay: plain WHIP and WHEP with the same stats, DELETE on close."""
    b = sdk_browser
    room = "sdk-http"
    w = b.call("whipPublish", node.whip_url(room), node.token(room, "whip", publish=True), {})
    p = None
    try:
        assert w["location"].startswith(f"{node.base}/whip/{room}/"), w
        p = b.call("whepPlay", node.whep_url(room), node.token(room, "whep", subscribe=True), {"layer": "high"})
        assert p["location"].startswith(f"{node.base}/whep/{room}/"), p
        video = wait_until(lambda: (lambda v: v if (v.get("framesDecoded") or 0) > 5 else None)(
            b.call("httpStats", p["id"])["video"] or {}), 20, 0.3, "WHEP framesDecoded > 5")
        sent = b.call("httpStats", w["id"])["video"]
        assert video["mimeType"] == "video/VP8" and video["loss"] <= 0.05, video
        assert sent["framesSent"] > 0 and sent["layers"], sent
    finally:
        statuses = [b.call("httpClose", i["id"]) for i in (p, w) if i]
    assert statuses == [200, 200][:len(statuses)], statuses


# ------------------------------------------------------------------------------------------------
# 4. the node serves the SDK and the demo; the demo works in Chromium
# ------------------------------------------------------------------------------------------------
def test_node_serves_sdk_and_demo(node, sdk_browser):
    r = requests.get(node.base + "/sdk/mediamesh.js", timeout=5)
    assert r.status_code == 200, r.status_code
    assert "javascript" in r.headers.get("content-type", ""), r.headers
    assert r.headers.get("access-control-allow-origin") == "*", r.headers
    assert "export async function connect" in r.text
    r = requests.get(node.base + "/demo", timeout=5)
    assert r.status_code == 200, r.status_code
    assert r.headers.get("content-type", "").startswith("text/html"), r.headers
    assert "/sdk/mediamesh.js" in r.text

    # the demo in a new tab: publish the camera, watch it, frames on the stats line
    b = sdk_browser
    driver = b.driver
    room = "sdk-demo"
    token = node.token(room, "demo-user", publish=True, subscribe=True)
    main_tab = driver.current_window_handle
    b.console()  # drain what earlier tests logged
    driver.switch_to.new_window("tab")
    try:
        driver.get(f"{node.base}/demo#token={token}&room={room}&loopback=1")
        wait_until(lambda: driver.execute_script("return document.title.includes('SDK')"), 10,
                   what="the demo's module to load")
        driver.find_element("id", "publish").click()
        wait_until(lambda: "live" in driver.find_element("id", "status").text, 20, 0.3,
                   "the demo publisher to go live")
        driver.find_element("id", "watch").click()
        wait_until(lambda: "watching" in driver.find_element("id", "status").text, 20, 0.3,
                   "the demo viewer to watch")

        def frames():
            text = driver.find_element("id", "stats").text
            n = int(text.split("frames ", 1)[1].split(" ", 1)[0])
            return text if n > 10 else None

        line = wait_until(frames, 20, 0.5, "frames > 10 on the demo's stats line")
        print(f"[sdk] demo stats line: {line}")
        logs = driver.get_log("browser")
        severe = [e for e in logs if e.get("level") == "SEVERE"]
        assert not severe, f"console errors on the demo page: {severe}"
        driver.find_element("id", "stop").click()
        wait_until(lambda: "stopped" in driver.find_element("id", "status").text, 10, 0.3, "demo stop")
    finally:
        driver.close()
        driver.switch_to.window(main_tab)
