"""One aiortc publisher (WHIP), three aiortc viewers (WHEP) on one node: every viewer decodes
video and receives audio; after every session is DELETEd the room is gone (admin API 404) and
mediamesh_webrtc_active_connections is back to 0."""

import asyncio
import time

import pytest

import whipwhep as ww
from conftest import wait_until

ROOM = "e2e-fanout"
VIEWERS = 3
pytestmark = pytest.mark.timeout(120)


def test_fanout_one_publisher_three_viewers(node):
    pub_token = node.token(ROOM, "publisher-1", publish=True)
    view_tokens = [node.token(ROOM, f"viewer-{i}", subscribe=True) for i in range(VIEWERS)]
    admin = node.token("*", "e2e-admin", admin=True)

    async def live_phase():
        t0 = time.monotonic()
        pub = await ww.publish(node.whip_url(ROOM), pub_token)
        sessions = [pub]
        try:
            assert pub.location.startswith(node.base + f"/whip/{ROOM}/"), pub.location
            viewers = await asyncio.gather(*(ww.play(node.whep_url(ROOM), t) for t in view_tokens))
            sessions += viewers
            await asyncio.gather(*(v.wait_frames(video=60, audio=10, timeout=30) for v in viewers))
            for i, v in enumerate(viewers):
                print(f"viewer {i}: {v.counter.video} video frames {v.counter.video_size}, "
                      f"{v.counter.audio} audio frames, connected in {v.connect_seconds:.2f}s")
                assert v.counter.video >= 60 and v.counter.audio > 0

            # while live: the admin API lists 1 publisher and 3 subscribers, metric counts 4
            r = await asyncio.to_thread(node.admin_room, ROOM, admin)
            assert r.status_code == 200, f"GET /admin/v1/rooms/{ROOM} -> {r.status_code}: {r.text[:300]}"
            room = r.json()
            assert room["room"] == ROOM and room["node"] == "e2e-1", room
            assert isinstance(room["epoch"], int), room
            assert len(room["publishers"]) == 1 and len(room["subscribers"]) == VIEWERS, room
            assert all("session" in s for s in room["publishers"] + room["subscribers"]), room
            listing = (await asyncio.to_thread(node.get, "/admin/v1/rooms", admin)).json()
            assert ROOM in [x["room"] for x in listing["rooms"]], listing
            active = await asyncio.to_thread(
                wait_until, lambda: node.active_connections() == 1 + VIEWERS, 10,
                what=f"mediamesh_webrtc_active_connections == {1 + VIEWERS}")
            print(f"live: admin ok, active connections {node.active_connections()}, "
                  f"{time.monotonic() - t0:.1f}s")
        finally:
            statuses = [await s.close() for s in reversed(sessions)]
        print("DELETE statuses:", statuses)
        assert all(st in (200, 204) for st in statuses), statuses

    ww.run(live_phase(), timeout=100)

    t1 = time.monotonic()
    wait_until(lambda: node.admin_room(ROOM, admin).status_code == 404, 15,
               what=f"GET /admin/v1/rooms/{ROOM} -> 404 after all sessions were deleted")
    wait_until(lambda: node.active_connections() == 0, 20,
               what="mediamesh_webrtc_active_connections == 0")
    print(f"room gone and active connections 0 in {time.monotonic() - t1:.2f}s")
    assert node.alive()
