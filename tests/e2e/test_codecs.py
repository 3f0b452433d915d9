"""Codecs other than VP8 end to end: an aiortc publisher sending H.264 (aiortc's libx264 via
PyAV) is forwarded to aiortc viewers, who can only decode it if the node forwarded H.264
untouched with the payload type each viewer negotiated."""

import asyncio

import pytest

import whipwhep as ww

pytestmark = pytest.mark.timeout(120)


def test_h264_publisher_to_h264_viewers(node):
    room = "e2e-h264"
    pub_token = node.token(room, "h264-publisher", publish=True)
    view_tokens = [node.token(room, f"h264-viewer-{i}", subscribe=True) for i in range(2)]

    async def scenario():
        pub = await ww.publish(node.whip_url(room), pub_token, video_codec="video/H264")
        sessions = [pub]
        try:
            viewers = [await ww.play(node.whep_url(room), t) for t in view_tokens]
            sessions += viewers
            await asyncio.gather(*(v.wait_frames(video=30, audio=5, timeout=40) for v in viewers))
            for v in viewers:
                answer = v.answer
                video_section = answer[answer.index("m=video"):]
                if "m=" in video_section[2:]:
                    video_section = video_section[: video_section.index("m=", 2)]
                rtpmaps = [line for line in video_section.splitlines() if line.startswith("a=rtpmap:")]
                print("viewer answer video codecs:", rtpmaps)
                assert any("H264/90000" in line for line in rtpmaps), rtpmaps
                assert v.counter.video >= 30, v.counter.video
        finally:
            for s in reversed(sessions):
                await s.close()

    ww.run(scenario(), timeout=100)
