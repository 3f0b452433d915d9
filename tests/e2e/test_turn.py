"""The embedded TURN relay with real clients.

(a) coturn's turnutils_uclient allocates and relays through the node's relay to a
    turnutils_peer on 127.0.0.1 (allow-listed with --turn-allow), with credentials from the
    node's secret (-W, set through POST /admin/v1/turn/rotate) and with a minted credential
    from a WHIP Link header (-u/-w); a wrong secret makes it fail.
(b) an aiortc viewer restricted to relay candidates (iceTransportPolicy=RELAY) watches a room
    through WHEP with the ICE servers of the node's Link headers and decodes frames; every local
    candidate is `typ relay`.
Everything stays on 127.0.0.1."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import time

import pytest
import requests
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

import whipwhep as ww
from conftest import Node, free_udp_range, require_binary, start_or_fail, stop_node

pytestmark = pytest.mark.timeout(180)
UCLIENT = shutil.which("turnutils_uclient") or "/usr/bin/turnutils_uclient"
PEER = shutil.which("turnutils_peer") or "/usr/bin/turnutils_peer"
LINK = re.compile(r'<(turn:[^>]+)>;\s*rel="ice-server";\s*username="([^"]*)";\s*credential="([^"]*)"')


@pytest.fixture(scope="module")
def peer_port():
    # uclient's RTCP allocations talk to the peer's port + 1 (turnutils_peer listens on both)
    lo, _ = free_udp_range(2)
    return lo


@pytest.fixture(scope="module")
def turn_node(tmp_path_factory, peer_port):
    n = Node(require_binary(), tmp_path_factory.mktemp("turn-node"), node_id="e2e-turn")
    # relay ports apart from the media ports (the node refuses an overlap), the TURN and peer ports
    taken = {n.turn_port, peer_port, peer_port + 1}
    while True:
        lo, hi = free_udp_range(400)
        if (hi < n.media_lo or lo > n.media_hi) and not any(lo <= p <= hi for p in taken):
            break
    n.extra_args = ["--turn-allow", f"127.0.0.1:{peer_port}-{peer_port + 1}", "--turn-relay-ports", f"{lo}-{hi}"]
    yield start_or_fail(n)
    stop_node(n)


@pytest.fixture(scope="module")
def secret(turn_node):
    value = "e2e-turn-" + secrets.token_hex(16)
    admin = turn_node.token("*", "e2e-admin", admin=True)
    r = requests.post(turn_node.base + "/admin/v1/turn/rotate", json={"secret": value},
                      headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    assert r.status_code == 200, r.text
    return value


@pytest.fixture(scope="module")
def echo_peer(peer_port):
    proc = subprocess.Popen([PEER, "-L", "127.0.0.1", "-p", str(peer_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    time.sleep(0.3)
    assert proc.poll() is None, "turnutils_peer did not start"
    yield proc
    proc.terminate()
    proc.wait(5)


def uclient(node: Node, peer_port: int, *auth: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [UCLIENT, *auth, "-e", "127.0.0.1", "-r", str(peer_port), "-p", str(node.turn_port),
           "-n", "50", "-l", "200", "-z", "10", *extra, "127.0.0.1"]
    print("[e2e]", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    print(r.stdout[-1500:], r.stderr[-500:])
    return r


def lost(output: str) -> str | None:
    m = re.search(r"Total lost packets (\d+) \(([\d.]+)%\)", output)
    return m and m.group(1)


def link_servers(resp) -> list[tuple[str, str, str]]:
    return LINK.findall(resp.headers.get("Link", ""))


async def fetch_link_servers(url: str, token: str, direction: str):
    """POST an offer with one video transceiver (``direction``) to the WHIP/WHEP ``url``, DELETE
    the session again; -> (the answer's ``Link`` ICE servers [(url, username, credential)], the
    response).  aiortc cannot change its configuration after the offer, so the ICE servers of a
    session come from a first one like this."""
    pc = ww.new_pc()
    try:
        pc.addTransceiver("video", direction=direction)
        await pc.setLocalDescription(await pc.createOffer())
        _, location, resp = await ww.post_offer(url, token, pc.localDescription.sdp)
    finally:
        await pc.close()
    await ww.delete(location, token)
    return link_servers(resp), resp


def test_uclient_relays_with_the_node_secret(turn_node, secret, echo_peer, peer_port):
    # channels (default mode: RTP + RTCP allocations with EVEN-PORT)
    r = uclient(turn_node, peer_port, "-W", secret, "-u", "alice", extra=("-m", "2"))
    assert r.returncode == 0 and lost(r.stdout) == "0", r.stdout[-2000:]
    # Send indications + CreatePermission
    r = uclient(turn_node, peer_port, "-W", secret, "-u", "alice", extra=("-m", "2", "-c", "-s"))
    assert r.returncode == 0 and lost(r.stdout) == "0", r.stdout[-2000:]
    assert turn_node.metric("mediamesh_turn_relayed_packets_total") >= 400


def test_uclient_with_a_minted_link_credential(turn_node, echo_peer, peer_port):
    token = turn_node.token("linked", "link-user", publish=True)
    # a WHIP publish answered 201 (else WhipError) whose Link header carries a TURN credential
    servers, resp = ww.run(fetch_link_servers(turn_node.whip_url("linked"), token, "sendonly"), 30)
    assert servers and servers[0][0] == f"turn:127.0.0.1:{turn_node.turn_port}?transport=udp", resp.headers
    _, username, credential = servers[0]
    assert username.endswith(":link-user")
    r = uclient(turn_node, peer_port, "-u", username, "-w", credential, extra=("-m", "1", "-c"))
    assert r.returncode == 0 and lost(r.stdout) == "0", r.stdout[-2000:]


def test_uclient_with_a_wrong_secret_fails(turn_node, secret, echo_peer, peer_port):
    before = turn_node.metric("mediamesh_turn_auth_failures_total") or 0
    r = uclient(turn_node, peer_port, "-W", secret + "-wrong", "-u", "mallory", extra=("-m", "1", "-c", "-n", "5"))
    assert r.returncode != 0, r.stdout[-2000:]
    assert (turn_node.metric("mediamesh_turn_auth_failures_total") or 0) > before


def test_aiortc_relay_only_viewer_decodes(turn_node):
    room = "e2e-turn-relay"
    pub_token = turn_node.token(room, "turn-publisher", publish=True)
    view_token = turn_node.token(room, "turn-viewer", subscribe=True)
    allocations_before = turn_node.metric("mediamesh_turn_allocations_total") or 0
    relayed_before = turn_node.metric("mediamesh_turn_relayed_packets_total") or 0

    async def scenario():
        pub = await ww.publish(turn_node.whip_url(room), pub_token)
        sessions = [pub]
        try:
            # The ICE servers come with the WHIP/WHEP answers (RFC 9725 §4.6): a first WHEP
            # request fetches them.
            servers, resp = await fetch_link_servers(turn_node.whep_url(room), view_token, "recvonly")
            assert servers, resp.headers
            url, username, credential = servers[0]

            pc = RTCPeerConnection(RTCConfiguration(
                iceServers=[RTCIceServer(urls=url, username=username, credential=credential)],
                iceTransportPolicy=RTCIceTransportPolicy.RELAY))
            counter = ww.FrameCounter()
            counter.attach(pc)
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            viewer = await ww._negotiate(pc, turn_node.whep_url(room), view_token, 20.0, counter)
            sessions.append(viewer)
            candidates = [l for l in pc.localDescription.sdp.splitlines() if l.startswith("a=candidate")]
            print("local candidates:", candidates)
            assert candidates and all(" typ relay" in c for c in candidates), candidates
            await viewer.wait_frames(video=30, audio=5, timeout=30)
            print(f"relay-only viewer: {viewer.counter.video} video frames, {viewer.counter.audio} audio")
            assert viewer.counter.video >= 30
        finally:
            for s in reversed(sessions):
                await s.close()

    ww.run(scenario(), timeout=120)
    assert (turn_node.metric("mediamesh_turn_allocations_total") or 0) > allocations_before
    assert (turn_node.metric("mediamesh_turn_relayed_packets_total") or 0) > relayed_before + 30
