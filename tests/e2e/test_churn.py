"""One publisher, then many WHEP connect/disconnect cycles (connect = ICE + DTLS connected, then
DELETE), a few in parallel. The node's RSS at the end must be within 10% of its RSS after cycle
50 (closed connections are freed: webrtc-rs #906), and mediamesh_webrtc_active_connections must be
back to 1 (the publisher).

MEDIAMESH_CHURN_CYCLES (default 500) and MEDIAMESH_CHURN_PARALLEL (default 4) tune the run."""

import asyncio
import os
import time

import pytest

import whipwhep as ww
from conftest import wait_until

ROOM = "e2e-churn"
CYCLES = int(os.environ.get("MEDIAMESH_CHURN_CYCLES", "500"))
PARALLEL = int(os.environ.get("MEDIAMESH_CHURN_PARALLEL", "4"))
BASELINE_AT = 50
pytestmark = pytest.mark.timeout(360)


def test_whep_churn_frees_connections(node):
    assert CYCLES > BASELINE_AT
    pub_token = node.token(ROOM, "churn-publisher", publish=True)
    view_token = node.token(ROOM, "churn-viewer", subscribe=True)
    rss = {}
    failures = []

    async def main():
        # a small, cheap publisher: 160x120 at 15 fps plus the tone
        pub = await ww.publish(node.whip_url(ROOM), pub_token, width=160, height=120, fps=15)
        done = 0
        next_cycle = 0
        t0 = time.monotonic()

        async def worker():
            nonlocal done, next_cycle
            while next_cycle < CYCLES:
                i = next_cycle
                next_cycle += 1
                try:
                    s = await ww.play(node.whep_url(ROOM), view_token, connect_timeout=15)
                    status = await s.close()
                    if status not in (200, 204):
                        failures.append(f"cycle {i}: DELETE -> {status}")
                except Exception as e:
                    failures.append(f"cycle {i}: {type(e).__name__}: {e}")
                done += 1
                if done == BASELINE_AT:
                    rss["cycle50"] = node.rss_kib()
                    print(f"cycle {done}: RSS {rss['cycle50']} KiB, {time.monotonic() - t0:.1f}s")
                elif done % 100 == 0:
                    print(f"cycle {done}: RSS {node.rss_kib()} KiB, {len(failures)} failures, "
                          f"{time.monotonic() - t0:.1f}s")
                if len(failures) > 10:
                    raise RuntimeError("too many failed cycles:\n" + "\n".join(failures))

        try:
            await asyncio.gather(*(worker() for _ in range(PARALLEL)))
            elapsed = time.monotonic() - t0
            print(f"{CYCLES} cycles in {elapsed:.1f}s ({CYCLES / elapsed:.1f}/s), {PARALLEL} in parallel")
            assert pub.pc.connectionState == "connected", "publisher dropped during churn"
            active = await asyncio.to_thread(
                wait_until, lambda: node.active_connections() == 1, 20, 0.5,
                "mediamesh_webrtc_active_connections == 1 (the publisher)")
            rss["end"] = node.rss_kib()
        finally:
            await pub.close()

    ww.run(main(), timeout=330)
    growth = (rss["end"] - rss["cycle50"]) / rss["cycle50"]
    print(f"RSS after cycle {BASELINE_AT}: {rss['cycle50']} KiB; after {CYCLES}: {rss['end']} KiB "
          f"({growth:+.1%}); failed cycles: {len(failures)}")
    assert not failures, "\n".join(failures)
    assert abs(growth) <= 0.10, (
        f"RSS grew {growth:+.1%} from cycle {BASELINE_AT} ({rss['cycle50']} KiB) to "
        f"cycle {CYCLES} ({rss['end']} KiB): closed connections are not freed")
