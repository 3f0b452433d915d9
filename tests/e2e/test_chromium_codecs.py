"""VP9 and AV1 are passed through when both ends offer them: headless Chromium publishes its
fake camera with one codec preferred, a Chromium viewer plays it, decodes frames, and its
inbound stats name the same codec (the node never transcodes, so a decoded frame proves the
stream went through untouched)."""

import pytest

from conftest import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("mime", ["video/VP9", "video/AV1"])
def test_chromium_codec_pass_through(node, browser, mime):
    room = "e2e-" + mime.split("/")[1].lower()
    pub_token = node.token(room, "chromium-publisher", publish=True)
    view_token = node.token(room, "chromium-viewer", subscribe=True)
    ids = []
    try:
        pub = browser.call("publish", node.whip_url(room), pub_token,
                           {"simulcast": False, "width": 640, "height": 480, "codec": mime})
        ids.append(pub["id"])
        viewer = browser.call("play", node.whep_url(room), view_token)
        ids.append(viewer["id"])

        seen = {}

        def decoded():
            seen["viewer"] = browser.call("inbound", viewer["id"])
            stats = seen["viewer"]["video"] or {}
            return stats if (stats.get("framesDecoded") or 0) > 5 else None

        try:
            stats = wait_until(decoded, 30, 0.5, f"{mime} viewer framesDecoded > 5")
        except TimeoutError as e:
            publisher = browser.call("outbound", pub["id"])
            raise AssertionError(f"{e}; viewer: {seen.get('viewer')}; publisher: {publisher}; "
                                 f"room: {node.admin_room(room, node.token(room, 'e2e-admin', admin=True)).text}") from e
        print(f"{mime}: {stats['frameWidth']}x{stats['frameHeight']} framesDecoded={stats['framesDecoded']} "
              f"codec={stats['mimeType']}")
        assert (stats["mimeType"] or "").lower() == mime.lower(), stats
    finally:
        for session_id in reversed(ids):
            browser.call("stop", session_id)
