"""The operators' dashboard (GET /, src/http/dashboard.html) in headless Chromium against a
three-node cluster (n1 seoul, n2 seoul, n3 busan; see cluster.py):

1. the page is one self-contained HTML file (no external resources, no innerHTML) with its CSP;
2. loaded with ``#token=<admin jwt>`` it drops the token from the address bar, shows Seoul and
   Busan side by side with the node cards (state, leader, membership), and a live room (aiortc
   WHIP publisher + WHEP viewer) under its host's card with its viewer count; a screenshot goes to
   the test's tmp dir and ``tests/e2e/artifacts/dashboard.png``;
3. the migrate control moves the room to another node (n3, the Busan node) without a page reload:
   the room shows up under the target's card, ``#status`` reports success, every node's admin
   API places the room on the target; the migrate <select> keeps the operator's choice across
   re-renders; a drain dismissed in confirm() sends nothing;
4. without a token the page asks for one (``#token-form``); a wrong token and a token without the
   admin grant are refused (401 / 403) and asked for again; the right one shows the cluster.
"""

from __future__ import annotations

import re
import shutil
import time
from types import SimpleNamespace

import pytest
import requests

import whipwhep as ww
from cluster import Cluster
from conftest import HERE, _start_chromium, wait_until

ROOM = "dash-room"
PUBLISHER_NAME = "김민수"
ARTIFACTS = HERE / "artifacts"
pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dash-cluster"), extra_args=["--drain-deadline-ms", "5000"])
    c.start(timeout=45)
    yield c
    c.stop()


def placement(cluster: Cluster, node_id: str = "n1"):
    r = cluster.get(node_id, f"/admin/v1/rooms/{ROOM}")
    return r.json().get("placement", {}).get("node") if r.status_code == 200 else None


@pytest.fixture(scope="module")
def media(cluster):
    """A live room: an aiortc WHIP publisher (to n1, region preference seoul: placed on n1 or
    n2) and a WHEP viewer decoding it on the host."""
    n1 = cluster["n1"]
    # a personal name with Hangul: the dashboard may show it only masked (Kim*Su)
    pub_token = n1.token(ROOM, PUBLISHER_NAME, publish=True)
    view_token = n1.token(ROOM, "dash-viewer", subscribe=True)
    # the sessions must stay up while Selenium drives the page: they live on a background loop
    loop = ww.BackgroundLoop("aiortc")
    try:
        t0 = time.monotonic()
        # a WHIP POST to a node that does not host the room is answered 307 to the host
        pub = loop.adopt(loop.run(ww.publish(n1.whip_url(ROOM), pub_token, fps=15,
                                             headers={"x-region-preference": "seoul"})))
        host = wait_until(lambda: placement(cluster), 10, what=f"a placement of {ROOM}")
        viewer = loop.adopt(loop.run(ww.play(cluster[host].whep_url(ROOM), view_token)))
        loop.run(viewer.wait_frames(video=10, timeout=20), 25)
        print(f"[e2e] {ROOM} hosted on {host}: publisher {pub.location}, viewer decoding "
              f"({viewer.counter.video} frames) in {time.monotonic() - t0:.1f}s")
        yield SimpleNamespace(host=host, publisher=pub, viewer=viewer)
    finally:
        loop.close(10)  # DELETE + close each session, last first; a failure is printed


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    udd = tmp_path_factory.mktemp("dash-chromium")
    d = _start_chromium(udd)
    d.set_window_size(1440, 1000)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(udd, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# page helpers
# ------------------------------------------------------------------------------------------------
def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def exists(driver, selector: str) -> bool:
    return js(driver, "return document.querySelector(arguments[0]) !== null", selector)


def text_of(driver, selector: str) -> str:
    return js(driver, "const e = document.querySelector(arguments[0]); return e ? e.textContent : null",
              selector) or ""


def visible(driver, selector: str) -> bool:
    return js(driver, "const e = document.querySelector(arguments[0]);"
                      "return !!e && e.getClientRects().length > 0", selector)


def updated(driver) -> int:
    return int(js(driver, "return document.body.dataset.updated || '0'"))


def wait_renders(driver, n: int = 1, timeout: float = 10):
    """Waits until the page rendered ``n`` more polls."""
    start = updated(driver)
    wait_until(lambda: updated(driver) >= start + n, timeout, what=f"{n} more dashboard renders")


def console(driver) -> str:
    try:
        return "\n".join(f"{e['level']} {e['message']}" for e in driver.get_log("browser"))
    except Exception as e:
        return f"(no console: {e})"


def wait_page(driver, predicate, timeout: float, what: str):
    try:
        return wait_until(predicate, timeout, what=what)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n--- #status: {text_of(driver, '#status')!r}, #poll-error: "
                             f"{text_of(driver, '#poll-error')!r}\n--- console ---\n{console(driver)}")


def submit_token(driver, token: str):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "token-input")
    box.clear()
    box.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_page_is_self_contained(cluster):
    """Every node serves the same page: HTML with its CSP, nothing loaded from elsewhere, no
    HTML built from strings."""
    pages = []
    for n in cluster:
        r = requests.get(n.base + "/", timeout=5)
        assert r.status_code == 200, (n.node_id, r.status_code)
        assert r.headers["Content-Type"].startswith("text/html"), r.headers
        csp = r.headers.get("Content-Security-Policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
        pages.append(r.text)
    assert len(set(pages)) == 1
    page = pages[0]
    assert not re.search(r"<(script|img|iframe|link)\b[^>]*\b(src|href)\s*=", page, re.I), \
        "the dashboard must not load other resources"
    assert not re.search(r"\b(innerHTML|outerHTML|insertAdjacentHTML|document\.write)\b\s*(=|\()", page), \
        "build the DOM with createElement/textContent"
    assert "?token=" not in page and "sessionStorage" in page


def test_cluster_view_and_migrate(cluster, media, driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    host = media.host
    target = "n3" if host != "n3" else "n1"
    token = cluster.admin_token
    t0 = time.monotonic()
    driver.get(f"{cluster['n1'].base}/#token={token}")  # any node answers for the whole cluster

    # regions side by side, the node cards in them
    wait_page(driver, lambda: all(exists(driver, f'[data-region="{r}"] [data-node="{n}"]')
                                  for r, n in (("seoul", "n1"), ("seoul", "n2"), ("busan", "n3"))),
              15, "n1, n2 under seoul and n3 under busan")
    print(f"[e2e] dashboard rendered in {time.monotonic() - t0:.1f}s")
    assert "token" not in driver.current_url, f"the token stayed in the address bar: {driver.current_url}"
    assert not exists(driver, "#token-form:not([hidden])")
    regions = js(driver, "return [...document.querySelectorAll('[data-region]')].map(e => e.dataset.region)")
    assert regions == ["seoul", "busan"], regions
    boxes = js(driver, "return [...document.querySelectorAll('[data-region]')]"
                       ".map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width]; })")
    (sx, sy, sw), (bx, by, _) = boxes
    assert bx >= sx + sw - 1 and abs(by - sy) < 2, f"seoul and busan not side by side: {boxes}"
    cards = js(driver, "return [...document.querySelectorAll('[data-node]:not(button)')].map(e => "
                       "[e.closest('[data-region]').dataset.region, e.dataset.node, e.dataset.state, "
                       "e.dataset.leader, e.dataset.membership])")
    leader = cluster.leader()
    assert sorted(c[1] for c in cards) == ["n1", "n2", "n3"], cards
    for region, node, state, is_leader, membership in cards:
        assert state == "alive" and membership == "voter", cards
        assert is_leader == ("true" if node == leader else "false"), (leader, cards)

    # the live room under its host's card, with its viewer
    entry = f'[data-node="{host}"] [data-room="{ROOM}"][data-host="{host}"]'
    wait_page(driver, lambda: js(driver, "const e = document.querySelector(arguments[0]);"
                                         "return !!e && e.dataset.viewers === '1'", entry),
              10, f"{ROOM} under {host} with 1 viewer")
    text = text_of(driver, entry)
    assert ROOM in text and "1 viewer" in text and "epoch" in text, text
    # names with Hangul: only the masked romanization reaches the page
    wait_page(driver, lambda: js(driver, "const e = document.querySelector(arguments[0] + ' .publishers');"
                                         "return !!e && e.textContent === 'Kim*Su'", entry),
              10, f"{ROOM}'s publisher shown as Kim*Su")
    assert PUBLISHER_NAME not in driver.page_source, "the raw name reached the dashboard"
    sel = f'select[data-migrate-target][data-room="{ROOM}"]'
    options = js(driver, "return [...document.querySelector(arguments[0]).options].map(o => o.value)", sel)
    assert sorted(options) == sorted({"n1", "n2", "n3"} - {host}), options

    # screenshot
    shot = tmp_path / "dashboard.png"
    assert driver.save_screenshot(str(shot))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "dashboard.png")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)
    print(f"[e2e] screenshot {len(data)} bytes: {ARTIFACTS / 'dashboard.png'}")

    # choose the target: the choice survives re-renders
    js(driver, "window.__noReload = 42")
    Select(driver.find_element(By.CSS_SELECTOR, sel)).select_by_value(target)
    wait_renders(driver, 2)
    assert js(driver, "return document.querySelector(arguments[0]).value", sel) == target

    # migrate
    t1 = time.monotonic()
    driver.find_element(By.CSS_SELECTOR, f'[data-action="migrate"][data-room="{ROOM}"]').click()
    busy = js(driver, "return [document.querySelector(arguments[0]).disabled, "
                      "document.querySelector('#status').textContent]",
              f'[data-action="migrate"][data-room="{ROOM}"]')
    assert busy[0] or "migrated" in busy[1], f"the migrate button stayed enabled: {busy}"
    moved = f'[data-node="{target}"] [data-room="{ROOM}"][data-host="{target}"]'
    wait_page(driver, lambda: exists(driver, moved), 30, f"{ROOM} under {target}'s card")
    wait_page(driver, lambda: js(driver, "return document.querySelector('#status').dataset.kind") != "busy",
              30, "the migrate call to answer")
    print(f"[e2e] migrated {host} -> {target} in the page in {time.monotonic() - t1:.1f}s: "
          f"{text_of(driver, '#status')!r}")
    assert js(driver, "return window.__noReload") == 42, "the page reloaded"
    status = text_of(driver, "#status")
    assert js(driver, "return document.querySelector('#status').dataset.kind") == "ok", status
    assert "migrated" in status and ROOM in status and target in status, status
    assert not exists(driver, f'[data-node="{host}"] [data-room="{ROOM}"][data-host]')
    for n in cluster.ids:
        wait_until(lambda: placement(cluster, n) == target, 5, what=f"{n}: {ROOM} placed on {target}")
    # the old host keeps the WHIP/WHEP sessions (they cannot move) and relays the room
    relay = f'[data-node="{host}"] [data-room="{ROOM}"][data-relay-of="{target}"]'
    wait_page(driver, lambda: exists(driver, relay), 10, f"{ROOM} relayed by {host}")
    assert "relay" in text_of(driver, relay)
    after = tmp_path / "dashboard-migrated.png"
    assert driver.save_screenshot(str(after))
    shutil.copyfile(after, ARTIFACTS / "dashboard-migrated.png")

    # migrations panel: the finished migration, or n/a when the node does not report them
    if cluster.get("n1", "/admin/v1/migrations").status_code == 200:
        wait_page(driver, lambda: ROOM in text_of(driver, "#migrations")
                  and "ok" in text_of(driver, "#migrations"), 10, "the migration under #migrations")
    else:
        assert "n/a" in text_of(driver, "#migrations")

    # drain: confirm() dismissed -> nothing sent
    driver.find_element(By.CSS_SELECTOR, '[data-action="drain"][data-node="n2"]').click()
    alert = wait_until(lambda: driver.switch_to.alert, 5, what="the drain confirm()")
    assert "n2" in alert.text
    alert.dismiss()
    wait_page(driver, lambda: "cancelled" in text_of(driver, "#status"), 5, "drain cancelled")
    wait_renders(driver, 1)
    assert all(x["state"] == "alive" for x in cluster.status("n1")["nodes"])
    assert js(driver, "return window.__noReload") == 42


def test_token_prompt(cluster, driver):
    """A tab without a token asks for one; wrong ones are refused and asked for again."""
    from selenium.webdriver.common.by import By

    first = driver.current_window_handle if driver.window_handles else None
    driver.switch_to.new_window("tab")  # a new tab: its own, empty sessionStorage
    try:
        driver.get(cluster["n2"].base + "/")
        wait_page(driver, lambda: visible(driver, "#token-form"), 10, "the token form")
        assert not visible(driver, "[data-node]") and updated(driver) == 0

        submit_token(driver, "not-a-token")
        wait_page(driver, lambda: "401" in text_of(driver, "#token-error"), 10, "401 for a wrong token")
        assert visible(driver, "#token-form") and not visible(driver, "[data-node]")

        viewer = cluster["n1"].token(ROOM, "not-an-admin", subscribe=True)
        submit_token(driver, viewer)
        wait_page(driver, lambda: "403" in text_of(driver, "#token-error"), 10, "403 without the admin grant")
        assert visible(driver, "#token-form")

        submit_token(driver, cluster.admin_token)
        wait_page(driver, lambda: all(visible(driver, f'[data-node="{n}"]') for n in cluster.ids),
                  10, "the node cards after the right token")
        assert not visible(driver, "#token-form")
        # the token went only into the Authorization header: no request URL carries it
        urls = js(driver, "return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and not any(cluster.admin_token in u or viewer in u for u in urls), urls
        assert "token" not in driver.current_url
        # a reload keeps it (sessionStorage of this tab)
        driver.refresh()
        wait_page(driver, lambda: visible(driver, '[data-node="n1"]'), 10, "the cards after a reload")
        assert not visible(driver, "#token-form")
    finally:
        driver.close()
        if first:
            driver.switch_to.window(first)
