"""Validate the harness itself, without the mediamesh server (runs in CI; < 30 s).

* aiortc publisher -> aiortc viewer, in-process, loopback ICE: the synthetic VP8 video and the
  Opus tone are decoded (so a failure against the node is not the client's fault);
* whipwhep.publish/play over HTTP against an aiortc mock WHIP/WHEP endpoint (201, relative
  Location, DELETE);
* headless Chromium (the page in pages/, served from another origin) publishing via WHIP to an
  aiortc peer that decodes its frames, and playing via WHEP from an aiortc peer (framesDecoded);
* Chromium encodes three simulcast layers for a 1280x720 capture.
"""

import asyncio
import time

import pytest
from aiortc import RTCSessionDescription

import whipwhep as ww
from conftest import wait_until
from mockserver import MockWhipWhep

pytestmark = pytest.mark.timeout(60)


def test_aiortc_direct_decodes_video_and_audio():
    async def main():
        t0 = time.monotonic()
        pub, sub = ww.new_pc(), ww.new_pc()
        ww.prefer_codec(pub.addTransceiver(ww.SyntheticVideoTrack(), direction="sendonly"), "video/VP8")
        ww.prefer_codec(pub.addTransceiver(ww.ToneAudioTrack(), direction="sendonly"), "audio/opus")
        counter = ww.FrameCounter()
        counter.attach(sub)
        try:
            await pub.setLocalDescription(await pub.createOffer())
            assert "127.0.0.1" in pub.localDescription.sdp
            for line in pub.localDescription.sdp.splitlines():
                if line.startswith("a=candidate:"):
                    assert line.split()[4] == "127.0.0.1", f"non-loopback candidate: {line}"
            await sub.setRemoteDescription(pub.localDescription)
            await sub.setLocalDescription(await sub.createAnswer())
            await pub.setRemoteDescription(sub.localDescription)
            await ww.wait_connected(pub, 10)
            await ww.wait_connected(sub, 10)
            await counter.wait(video=60, audio=10, timeout=15)
        finally:
            counter.stop()
            await pub.close()
            await sub.close()
        print(f"direct aiortc: {counter.video} video frames {counter.video_size}, "
              f"{counter.audio} audio frames in {time.monotonic() - t0:.2f}s")
        assert counter.video >= 60 and counter.audio > 0
        assert counter.video_size == (320, 240)

    ww.run(main(), timeout=30)


@pytest.fixture
def mock():
    m = MockWhipWhep(token="selfcheck-token").start()
    yield m
    m.stop()


def test_whipwhep_client_against_mock(mock):
    async def main():
        pub = await ww.publish(f"{mock.base_url}/whip/r1", "selfcheck-token")
        viewer = await ww.play(f"{mock.base_url}/whep/r1", "selfcheck-token")
        try:
            assert pub.location.startswith(mock.base_url + "/whip/r1/")
            assert viewer.location.startswith(mock.base_url + "/whep/r1/")
            await viewer.wait_frames(video=60, audio=10, timeout=15)
            # what the mock decoded from our publisher
            (entry,) = mock.publishers.values()
            await entry["counter"].wait(video=60, audio=10, timeout=15)
        finally:
            assert await viewer.close() == 200
            assert await pub.close() == 200
        assert not mock.publishers and not mock.viewers
        print(f"via WHIP/WHEP mock: viewer {viewer.counter.video} video / {viewer.counter.audio} audio, "
              f"publisher connect {pub.connect_seconds:.2f}s, viewer connect {viewer.connect_seconds:.2f}s")
        # a wrong token is refused, with the error surfaced
        with pytest.raises(ww.WhipError, match="401"):
            await ww.play(f"{mock.base_url}/whep/r1", "wrong")

    ww.run(main(), timeout=45)


def test_chromium_publish_and_play_with_aiortc(browser, mock):
    t0 = time.monotonic()
    # Chromium publishes the fake camera via WHIP (fetch, cross-origin) to an aiortc peer
    pub = browser.call("publish", f"{mock.base_url}/whip/room", "selfcheck-token", {})
    assert pub["location"].startswith(mock.base_url + "/whip/room/")
    assert mock.preflights >= 1, "the page's POST should have needed a CORS preflight"
    (entry,) = mock.publishers.values()
    mock.call(entry["counter"].wait(video=30, audio=5, timeout=15), timeout=20)
    decoded_by_aiortc = entry["counter"].video
    size = entry["counter"].video_size

    # Chromium plays via WHEP from an aiortc peer sending the synthetic track
    view = browser.call("play", f"{mock.base_url}/whep/room", "selfcheck-token")
    stats = wait_until(
        lambda: (lambda s: s if (s["video"] or {}).get("framesDecoded", 0) >= 30
                 and (s["audio"] or {}).get("packetsReceived", 0) > 0 else None)(
            browser.call("inbound", view["id"])),
        timeout=15, what="Chromium framesDecoded >= 30")
    assert browser.call("stop", view["id"]) == 200
    assert browser.call("stop", pub["id"]) == 200
    assert not mock.publishers and not mock.viewers
    print(f"chromium->aiortc: {decoded_by_aiortc} frames decoded, {size}; aiortc->chromium: "
          f"framesDecoded={stats['video']['framesDecoded']} {stats['video']['frameWidth']}x"
          f"{stats['video']['frameHeight']}, audio packets={stats['audio']['packetsReceived']}; "
          f"{time.monotonic() - t0:.1f}s")
    assert size == (640, 480)
    assert stats["video"]["frameWidth"] == 320


def test_chromium_encodes_three_simulcast_layers_at_720p(browser):
    res = browser.call("simulcastProbe", 1280, 720, 3000)
    layers = {l["rid"]: l for l in res["layers"]}
    print("chromium simulcast 1280x720:",
          {rid: (l["frameWidth"], l["frameHeight"], l["framesEncoded"]) for rid, l in layers.items()})
    assert (res["captureWidth"], res["captureHeight"]) == (1280, 720)
    assert set(layers) == {"q", "h", "f"}
    for rid, width in (("q", 320), ("h", 640), ("f", 1280)):
        assert layers[rid]["framesEncoded"] > 0, f"layer {rid} not encoded: {layers[rid]}"
        assert layers[rid]["frameWidth"] == width
