"""The web console in Debian's Chromium, driven by Playwright, against `lambdabus up` (every
service its own process, as `make run` starts them): sign in, create, build, invoke, change,
follow logs, triggers, dead letters, the lifecycle stream; XSS, accessibility (axe-core),
themes and widths; and every API call the page made is a route of /v1/openapi.json.

Screenshots of each view land in `.cache/screenshots/` (not committed)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import (
    Browser,
    Dialog,
    Page,
    Playwright,
    Request,
    expect,
    sync_playwright,
)

from lambdabus_gateway.openapi import match_operation
from tests.e2e.conftest import Platform
from tests.e2e.helpers import ROOT, http, offline_platform, wait_for, wait_running

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
AXE = ROOT / "console" / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = ROOT / ".cache" / "screenshots"
XSS = "<img src=x onerror=alert(1)>"
WAIT = 60_000  # ms: a build and a rollout on a busy 2-core machine
expect.set_options(timeout=WAIT)

# The function the page creates: it echoes its data and an env var, and logs the call.
HANDLER = """import os


def main(event, context):
    print("called with", event.get("data"), flush=True)
    return {"greeting": os.environ.get("GREETING", "none"), "data": event.get("data")}
"""

FAILS_UNTIL_FIXED = """import os


def main(event, context):
    print("delivered", event.get("data"), flush=True)
    if os.environ.get("BROKEN") == "1":
        raise RuntimeError("broken on purpose")
    return {"ok": True}
"""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make browser` installs it)")
    if not (ROOT / "services/gateway/src/lambdabus_gateway/ui/index.html").exists():
        pytest.fail("the console is not built: run `make console`")
    yield from offline_platform(tmp_path_factory, "console")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    yield browser
    browser.close()


class Seen:
    """What the page did: API calls, dialogs (an XSS would open one)."""

    def __init__(self) -> None:
        self.calls: set[tuple[str, str]] = set()
        self.dialogs: list[str] = []


@pytest.fixture(scope="module")
def seen() -> Seen:
    return Seen()


@pytest.fixture(scope="module")
def page(browser: Browser, platform: Platform, seen: Seen) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(WAIT)

    def on_request(request: Request) -> None:
        path = urlsplit(request.url).path
        if path.startswith("/v1/"):
            seen.calls.add((request.method, path))

    def on_dialog(dialog: Dialog) -> None:
        seen.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("request", on_request)
    page.on("dialog", on_dialog)
    yield page
    context.close()


def gateway(platform: Platform) -> str:
    return platform.urls["gateway"]


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("document.getElementById('toast').className = ''")  # a passing notice
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def axe(page: Page, what: str) -> None:
    """axe-core in the page (evaluated through the DevTools protocol, so the page's CSP, which
    forbids inline scripts, stays as it is): no serious or critical violation."""
    page.evaluate(AXE.read_text())
    result = page.evaluate(
        "async () => await axe.run(document, {runOnly: ['wcag2a', 'wcag2aa', 'best-practice']})"
    )
    bad = [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"axe-core on {what}: {json.dumps(bad, indent=1)}"


def open_view(page: Page, platform: Platform, fragment: str) -> None:
    page.goto(f"{gateway(platform)}/ui/{fragment}")


def test_the_console_is_served_with_a_strict_policy(platform: Platform) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{gateway(platform)}/ui/", timeout=10) as response:
        csp = response.headers["Content-Security-Policy"]
        html = response.read().decode()
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    # no inline script or style in the page itself
    assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) is None
    assert "<style" not in html
    assert "style=" not in html


def test_sign_in_by_link_keeps_the_token_in_session_storage_only(
    page: Page, platform: Platform
) -> None:
    open_view(page, platform, f"#token={platform.token}")
    expect(page.get_by_role("heading", name="Functions in default")).to_be_visible()
    assert platform.token not in page.url
    assert page.evaluate("sessionStorage.getItem('lambdabus.token')") == platform.token
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("localStorage.length") == 0
    # signing out forgets it; a wrong token is refused with the API's own message
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('lambdabus.token')") is None
    page.get_by_label("Token").fill("lbt_0000000000000000_nope")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("token")
    shot(page, "sign-in")
    page.get_by_label("Token").fill(platform.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Functions in default")).to_be_visible()
    # the header names the token by its id, never its secret
    token_id = "_".join(platform.token.split("_")[:2])
    expect(page.locator("#who")).to_have_text(token_id)
    # someone else's sign-in link does not replace the token this tab holds
    status, minted = http(
        "POST",
        f"{gateway(platform)}/v1/tokens",
        {"name": "someone-else", "role": "viewer", "namespaces": ["elsewhere"]},
    )
    assert status == 201, minted
    open_view(page, platform, f"#token={minted['token']}")
    expect(page.get_by_role("alert")).to_contain_text("sign out before")
    assert minted["token"] not in page.url
    assert page.evaluate("sessionStorage.getItem('lambdabus.token')") == platform.token
    # a damaged link is refused with a message, not a broken page
    page.evaluate("sessionStorage.clear()")
    open_view(page, platform, "#token=%E0%A4%A")
    expect(page.get_by_role("alert")).to_contain_text("damaged")
    open_view(page, platform, f"#token={platform.token}")
    expect(page.get_by_role("heading", name="Functions in default")).to_be_visible()


def test_create_an_inline_function_watch_it_build_and_run_then_invoke_it(
    page: Page, platform: Platform
) -> None:
    open_view(page, platform, "#/functions")
    page.get_by_role("link", name="New function").click()
    page.get_by_label("Name", exact=True).fill("hello-ui")
    axe(page, "the new function page")
    shot(page, "new-function")
    editor = page.locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    # pasted, as a user would (typed text would be re-indented by the editor as it goes)
    page.evaluate(
        """text => {
            const data = new DataTransfer();
            data.setData("text/plain", text);
            document.querySelector(".cm-content").dispatchEvent(
                new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
        }""",
        HANDLER,
    )
    assert "GREETING" in editor.inner_text()
    page.get_by_role("button", name="Create").click()
    # the build log streams while the status moves through the lifecycle
    expect(page.get_by_role("heading", name="Build log")).to_be_visible()
    expect(page.locator(".log .line").first).to_be_visible()
    expect(page.locator("[data-lambda-status='running']")).to_be_visible()
    expect(page.locator("[data-image-status='completed']")).to_be_visible()
    expect(page.locator(".status-line")).to_contain_text("Running: True")
    assert page.locator(".log .line").count() > 1
    shot(page, "build-log")

    page.get_by_role("link", name="Invoke").click()
    page.get_by_label("Body").fill('{"data": "from-the-page"}')
    page.get_by_role("button", name="Invoke").click()
    expect(page.locator(".response-body")).to_contain_text("from-the-page")
    expect(page.locator(".result")).to_contain_text("200")
    axe(page, "the invoke page")
    shot(page, "invoke")


def test_change_an_env_var_and_see_the_rollout(page: Page, platform: Platform) -> None:
    open_view(page, platform, "#/fn/hello-ui/settings")
    page.get_by_label("Environment (KEY=value a line)").fill("GREETING=hi-there")
    axe(page, "the settings page")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".status-line")).to_contain_text("generation 2")
    expect(page.locator("[data-lambda-status='running']")).to_be_visible()
    shot(page, "function")

    def greeting() -> bool:
        page.get_by_role("link", name="Invoke").click()
        page.get_by_role("button", name="Invoke").click()
        expect(page.locator(".response-body")).to_be_visible()
        return "hi-there" in page.locator(".response-body").inner_text()

    wait_for(greeting, 30, "the new env var in an answer", interval=0.5)


def test_follow_the_runtime_log_while_invoking(page: Page, platform: Platform) -> None:
    open_view(page, platform, "#/fn/hello-ui/logs")
    expect(page.locator(".badge", has_text="live")).to_be_visible()
    url = f"{gateway(platform)}/v1/namespaces/default/functions/hello-ui/invoke"
    for n in range(3):
        status, _ = http("POST", url, {"data": f"followed-{n}"})
        assert status == 200
    for n in range(3):
        expect(page.locator(".log")).to_contain_text(f"'followed-{n}'")
    # each line once
    text = page.locator(".log").inner_text()
    assert [text.count(f"'followed-{n}'") for n in range(3)] == [1, 1, 1]
    axe(page, "the logs page")
    shot(page, "logs")


def test_a_trigger_made_on_the_page_delivers_an_event_published_from_it(
    page: Page, platform: Platform
) -> None:
    open_view(page, platform, "#/triggers")
    page.get_by_label("Name", exact=True).fill("hello-ui-orders")
    page.get_by_label("Function").select_option("hello-ui")
    page.get_by_label("Event type").fill("com.example.ui.order")
    page.get_by_role("button", name="Create trigger").click()
    expect(page.locator("[data-trigger='hello-ui-orders']")).to_be_visible()
    page.get_by_label("Type", exact=True).fill("com.example.ui.order")
    page.get_by_label("Data (JSON)").fill('{"order": "evt-42"}')
    page.get_by_role("button", name="Publish").click()
    expect(page.locator("#toast")).to_contain_text("published")
    axe(page, "the triggers page")
    shot(page, "triggers")
    open_view(page, platform, "#/fn/hello-ui/logs")
    expect(page.locator(".log")).to_contain_text("evt-42")


def test_a_dead_letter_is_redriven_from_the_page(page: Page, platform: Platform) -> None:
    base = f"{gateway(platform)}/v1/namespaces/default"
    status, body = http(
        "POST",
        f"{base}/functions",
        {
            "name": "fails-ui",
            "env": {"BROKEN": "1"},
            "source": {"files": {"handler.py": FAILS_UNTIL_FIXED}},
        },
    )
    assert status == 202, body
    wait_running(platform, "fails-ui")
    status, body = http(
        "POST",
        f"{base}/triggers",
        {
            "name": "fails-ui-t",
            "function": "fails-ui",
            "filter": {"type": "com.example.ui.fail"},
            "delivery": {"retries": 0, "timeout": 10},
        },
    )
    assert status == 201, body
    # structured mode (`http` sends application/json, which /v1/events refuses)
    status, body = _publish(platform, "dl-1", "com.example.ui.fail", {"n": "dead-1"})
    assert status == 202, body

    def dead() -> list[dict[str, Any]]:
        _, listed = http("GET", f"{base}/deadletters")
        return [d for d in listed["items"] if d["function"] == "fails-ui"]

    letters = wait_for(dead, 40, "a dead letter of fails-ui")
    # mend the function, then redrive from the page
    status, body = http("PATCH", f"{base}/functions/fails-ui", {"env": {"BROKEN": "0"}})
    assert status == 202, body
    wait_for(
        lambda: (
            http("GET", f"{base}/functions/fails-ui/status")[1].get("generation") == 2
            and wait_running(platform, "fails-ui")
        ),
        60,
        "fails-ui mended",
    )
    open_view(page, platform, "#/deadletters")
    row = page.locator(f"[data-deadletter='{letters[0]['id']}']")
    expect(row).to_be_visible()
    axe(page, "the dead letters page")
    shot(page, "deadletters")
    row.get_by_role("button", name=re.compile("Redrive")).click()
    expect(page.locator("#toast")).to_contain_text("redriven")
    wait_for(lambda: not dead(), 30, "the dead letter gone after its redrive")
    # delivered again, to the mended function: its log has the event twice (the failed
    # attempt and the redriven one), and no new dead letter comes of it
    open_view(page, platform, "#/fn/fails-ui/logs")
    expect(page.locator(".log .line", has_text="'dead-1'")).to_have_count(2)
    time.sleep(1)
    assert not dead()


def gateway_pid(platform: Platform) -> int | None:
    for pid in platform.descendants():
        with contextlib.suppress(OSError):
            if b"lambdabus_gateway" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    return None


WATCH_STATE = """() => {
    const badge = document.querySelector(".heading .badge");
    window.lambdabusStates = [badge.textContent];
    new MutationObserver(() => window.lambdabusStates.push(badge.textContent))
        .observe(badge, {childList: true, characterData: true, subtree: true});
}"""


def restart_gateway(platform: Platform) -> None:
    """Kill the gateway: `lambdabus up` starts it again on the same port, after a back-off."""
    old = gateway_pid(platform)
    assert old is not None, "no gateway process under lambdabus up"
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: gateway_pid(platform) not in (None, old), 30, "the gateway restarted")


def test_a_followed_log_resumes_after_a_drop_without_losing_or_repeating_a_line(
    page: Page, platform: Platform
) -> None:
    router = f"{platform.urls['router']}/default/hello-ui"
    open_view(page, platform, "#/fn/hello-ui/logs")
    state = page.locator(".heading .badge")
    expect(state).to_have_text("live")
    for n in range(2):
        assert http("POST", router, {"v": f"before-{n}"})[0] == 200
    expect(page.locator(".log")).to_contain_text("'before-1'")
    page.evaluate(WATCH_STATE)  # every state the page shows from here on
    restart_gateway(platform)
    for n in range(2):  # written while the page had no connection
        assert http("POST", router, {"v": f"during-{n}"})[0] == 200
    wait_for(
        lambda: "reconnecting" in page.evaluate("window.lambdabusStates"),
        30,
        "the page to notice the drop",
    )
    expect(state).to_have_text("live")
    for n in range(2):
        assert http("POST", router, {"v": f"after-{n}"})[0] == 200
    expect(page.locator(".log")).to_contain_text("'after-1'")
    text = page.locator(".log").inner_text()
    for word in ("before-0", "before-1", "during-0", "during-1", "after-0", "after-1"):
        assert text.count(f"'{word}'") == 1, f"{word} shown {text.count(word)} times:\n{text}"


def test_the_lifecycle_stream_resumes_after_a_drop_from_the_last_event(
    page: Page, platform: Platform
) -> None:
    base = f"{gateway(platform)}/v1/namespaces/default"
    open_view(page, platform, "#/events")
    state = page.locator(".heading .badge")
    expect(state).to_have_text("live")
    expect(page.locator("tbody")).to_contain_text("hello-ui")
    before = page.locator("tbody tr").count()
    page.evaluate(WATCH_STATE)
    restart_gateway(platform)
    wait_for(
        lambda: "reconnecting" in page.evaluate("window.lambdabusStates"),
        30,
        "the page to notice the drop",
    )
    expect(state).to_have_text("live")
    status, body = http(
        "POST",
        f"{base}/functions",
        {"name": "after-drop", "source": {"files": {"handler.py": HANDLER}}},
    )
    assert status == 202, body
    expect(page.locator("tbody")).to_contain_text("after-drop")
    ids = page.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert len(ids) == len(set(ids)), "an event shown twice after the reconnect"
    assert len(ids) > before


def _publish(platform: Platform, id_: str, type_: str, data: Any) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    event = {"specversion": "1.0", "id": id_, "source": "/tests", "type": type_, "data": data}
    request = urllib.request.Request(
        f"{gateway(platform)}/v1/events",
        data=json.dumps(event).encode(),
        method="POST",
        headers={
            "Content-Type": "application/cloudevents+json",
            "Authorization": f"Bearer {platform.token}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_strings_from_the_api_are_text_never_html(
    page: Page, platform: Platform, seen: Seen
) -> None:
    base = f"{gateway(platform)}/v1/namespaces/default"
    status, body = http(
        "POST",
        f"{base}/functions",
        {
            "name": "xss-ui",
            "description": XSS,
            "labels": {"team": "x"},
            "source": {"files": {"handler.py": HANDLER}},
        },
    )
    assert status == 202, body
    open_view(page, platform, "#/functions")
    cell = page.locator("[data-function='xss-ui'] td.description")
    expect(cell).to_have_text(XSS)
    assert page.locator("main img").count() == 0
    open_view(page, platform, "#/fn/xss-ui/overview")
    expect(page.locator(".facts")).to_contain_text(XSS)
    assert page.locator("main img").count() == 0
    time.sleep(0.5)  # an onerror would have fired by now
    assert seen.dialogs == []


def test_the_functions_view_in_both_themes_and_at_phone_width(
    page: Page, platform: Platform, browser: Browser
) -> None:
    open_view(page, platform, "#/functions")
    expect(page.locator("[data-function='hello-ui']")).to_be_visible()
    axe(page, "the functions view")
    shot(page, "functions")
    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light != dark
    axe(page, "the functions view, dark")
    shot(page, "functions-dark")
    page.emulate_media(color_scheme="light")
    # keyboard: the next tab stop shows the console's own focus ring (3 px, not the default)
    page.keyboard.press("Tab")
    focused = page.evaluate(
        "(() => { const s = getComputedStyle(document.activeElement);"
        " return [document.activeElement.tagName, s.outlineStyle, s.outlineWidth]; })()"
    )
    assert focused[0] in ("A", "BUTTON", "SELECT", "INPUT"), focused
    assert focused[1:] == ["solid", "3px"], focused
    # a phone: nothing wider than the screen but the table, which scrolls in its own box
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    small = phone.new_page()
    small.goto(f"{gateway(platform)}/ui/#token={platform.token}")
    expect(small.locator("[data-function='hello-ui']")).to_be_visible()
    width = small.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    small.screenshot(path=str(SHOTS / "functions-phone.png"), full_page=True)
    phone.close()


def test_the_lifecycle_stream_shows_what_happened(page: Page, platform: Platform) -> None:
    open_view(page, platform, "#/events")
    expect(page.locator(".badge", has_text="live")).to_be_visible()
    expect(page.locator("tbody")).to_contain_text("io.lambdabus.function.created")
    expect(page.locator("tbody")).to_contain_text("hello-ui")
    axe(page, "the lifecycle view")
    shot(page, "lifecycle")


def test_revisions_and_metrics_views(page: Page, platform: Platform) -> None:
    open_view(page, platform, "#/fn/hello-ui/revisions")
    expect(page.locator("[data-revision='hello-ui-00002']")).to_be_visible()
    expect(page.locator("output", has_text="total 100%")).to_be_visible()
    axe(page, "the revisions page")
    shot(page, "revisions")
    open_view(page, platform, "#/fn/hello-ui/metrics")
    expect(page.locator(".chart canvas").first).to_be_visible()
    expect(page.locator("main p").first).to_contain_text("calls")
    shot(page, "metrics")


DOCS_PAGE = """<!doctype html><title>docs</title>
<h1>How to call it</h1><p id="said">written by the author</p>
<script>document.getElementById("said").textContent = "a script ran";</script>
<img src=x onerror="document.getElementById('said').textContent='onerror ran'">
"""


def test_a_functions_own_docs_page_is_shown_without_its_scripts(
    page: Page, platform: Platform, seen: Seen
) -> None:
    base = f"{gateway(platform)}/v1/namespaces/default"
    files = {
        "lambda_main.py": "async def main(request):\n    return {'ok': True}\n",
        "docs/lambda.html": DOCS_PAGE,
        "docs/lambda.yml": "openapi: 3.0.3\ninfo: {title: docs-ui, version: '1'}\npaths: {}\n",
    }
    status, body = http(
        "POST", f"{base}/functions", {"name": "docs-ui", "source": {"files": files}}
    )
    assert status == 202, body
    open_view(page, platform, "#/fn/docs-ui/docs")
    frame = page.locator("iframe.docs")
    expect(frame).to_have_attribute("sandbox", "")
    inner = page.frame_locator("iframe.docs")
    expect(inner.locator("h1")).to_have_text("How to call it")
    time.sleep(0.5)
    expect(inner.locator("#said")).to_have_text("written by the author")
    shot(page, "docs")


def test_traffic_moves_by_slider_and_rolls_back_in_one_click(
    page: Page, platform: Platform
) -> None:
    base = f"{gateway(platform)}/v1/namespaces/default/functions/hello-ui"
    router = f"{platform.urls['router']}/default/hello-ui"

    def greetings(n: int = 20) -> set[str]:
        return {http("POST", router, {"v": 1})[1]["greeting"] for _ in range(n)}

    open_view(page, platform, "#/fn/hello-ui/revisions")
    page.get_by_role("button", name="Roll back to hello-ui-00001").click()
    expect(page.locator("#toast")).to_contain_text("traffic set")
    _, route = http("GET", f"{base}/traffic")
    assert [(t["revision"], t["percent"]) for t in route["traffic"]] == [("hello-ui-00001", 100)]
    wait_for(lambda: greetings() == {"none"}, 40, "every answer from v1 (no GREETING)")
    # back to v2 by the sliders
    page.get_by_label("Traffic to hello-ui-00001").fill("0")
    page.get_by_label("Traffic to hello-ui-00002").fill("100")
    expect(page.locator("output", has_text="total 100%")).to_be_visible()
    page.get_by_role("button", name="Apply traffic").click()
    expect(page.locator("#toast")).to_contain_text("traffic set")
    _, route = http("GET", f"{base}/traffic")
    assert [(t["revision"], t["percent"]) for t in route["traffic"]] == [("hello-ui-00002", 100)]
    wait_for(lambda: greetings() == {"hi-there"}, 40, "every answer from v2 again")
    # a sum other than 100 is refused with the API's message
    page.get_by_label("Traffic to hello-ui-00001").fill("30")
    expect(page.locator("output", has_text="total 130%")).to_be_visible()
    page.get_by_role("button", name="Apply traffic").click()
    expect(page.locator("#toast")).to_contain_text("130")


def test_a_function_from_a_dropped_zip_and_a_schedule_made_on_the_page(
    page: Page, platform: Platform, tmp_path: Path
) -> None:
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("handler.js", "module.exports = { main: async () => ({ zipped: true }) };\n")
    open_view(page, platform, "#/new")
    page.get_by_label("Name", exact=True).fill("zipped-ui")
    page.get_by_label("Runtime").select_option("nodejs20")
    page.get_by_label("Archive").set_input_files(str(archive))
    expect(page.locator(".drop")).to_contain_text("zipped.zip")
    page.get_by_role("button", name="Create").click()
    expect(page.locator("[data-lambda-status='running']")).to_be_visible()
    page.get_by_role("link", name="Invoke").click()
    page.get_by_role("button", name="Invoke").click()
    expect(page.locator(".response-body")).to_contain_text('"zipped":true')

    open_view(page, platform, "#/schedules")
    page.get_by_label("Name", exact=True).fill("nightly-ui")
    page.get_by_label("Function").select_option("zipped-ui")
    page.get_by_label("Cron").fill("0 3 * * *")
    page.get_by_role("button", name="Create schedule").click()
    row = page.locator("[data-schedule='nightly-ui']")
    expect(row).to_contain_text("0 3 * * *")
    axe(page, "the schedules page")
    shot(page, "schedules")
    # a bad cron is the API's 400, shown on the form
    page.get_by_label("Name", exact=True).fill("broken-ui")
    page.get_by_label("Cron").fill("every now and then")
    page.get_by_role("button", name="Create schedule").click()
    expect(page.get_by_role("alert")).to_contain_text("cron")
    row.get_by_role("button", name="Delete schedule nightly-ui").click()
    expect(row).to_have_count(0)


def test_secrets_are_written_never_shown_and_a_token_is_shown_once(
    page: Page, platform: Platform
) -> None:
    open_view(page, platform, "#/secrets")
    page.get_by_label("Name", exact=True).fill("db-ui")
    page.get_by_label("Keys and values (KEY=value a line)").fill("password=hunter2-ui\nuser=app")
    page.get_by_role("button", name="Save secret").click()
    row = page.locator("[data-secret='db-ui']")
    expect(row).to_contain_text("password, user")
    assert "hunter2-ui" not in page.content()
    axe(page, "the secrets page")
    shot(page, "secrets")
    row.get_by_role("button", name="Delete secret db-ui").click()
    expect(row).to_have_count(0)

    open_view(page, platform, "#/tokens")
    page.get_by_label("Name", exact=True).fill("ci-ui")
    page.get_by_label("Namespaces (comma-separated, * for every one)").fill("default")
    page.get_by_role("button", name="Mint").click()
    secret = page.get_by_label("The new token")
    expect(secret).to_have_value(re.compile(r"^lbt_[0-9a-f]{16}_"))
    minted = secret.input_value()
    token_id = minted.split("_")[1]
    row = page.locator(f"[data-token='{token_id}']")
    expect(row).to_contain_text("developer")
    axe(page, "the tokens page")
    shot(page, "tokens")
    # shown once: the view drawn again has the row, not the secret
    open_view(page, platform, "#/functions")
    open_view(page, platform, "#/tokens")
    expect(row).to_be_visible()
    assert minted not in page.content()
    row.get_by_role("button", name="Revoke token ci-ui").click()
    expect(row).to_have_count(0)


def test_every_call_the_console_made_is_in_the_openapi_document(
    platform: Platform, seen: Seen
) -> None:
    _, document = http("GET", f"{gateway(platform)}/v1/openapi.json")
    assert len(seen.calls) >= 15, sorted(seen.calls)
    undescribed = sorted(
        (method, path)
        for method, path in seen.calls
        if match_operation(document, method, path) is None
    )
    assert not undescribed, f"API calls the document does not describe: {undescribed}"
    assert seen.dialogs == []
