"""Browser tests: Playwright driving Debian's Chromium against the real server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alignforge.annotate import service as svc
from alignforge.annotate.db import open_db

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
XSS = [
    "<img src=x onerror=alert(1)>",
    "<script>alert('script')</script>",
    "[click me](javascript:alert('js-link'))",
    "[tricky](  jAvAsCrIpT:alert('case'))",
    "[entity](&#x6A;avascript:alert('entity'))",
    "<a href=\"javascript:alert('raw-a')\">raw anchor</a>",
    "![pic](http://127.0.0.1:1/x.png)",
    "<svg onload=alert('svg')></svg>",
    "[ref][r]\n\n[r]: javascript:alert('ref')",
]
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does)"
    ),
]


@pytest.fixture
def site(sqlite_url, tmp_path, server_factory, fast_hasher):
    engine, S = open_db(sqlite_url)
    svc.create_user(S, "alice", "alice-pass-1", hasher=fast_hasher)
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(3):
            f.write(
                json.dumps(
                    {
                        "id": f"x{i}",
                        "prompt": [
                            {"role": "user", "content": f"first question {i}"},
                            {"role": "assistant", "content": "an *earlier* answer"},
                            {"role": "user", "content": "\n\n".join(XSS)},
                        ],
                        "response_a": "\n\n".join(XSS),
                        "response_b": f"**plain** answer {i}",
                    }
                )
                + "\n"
            )
    svc.import_pairs(S, tmp_path / "p.jsonl")
    engine.dispose()
    return server_factory(sqlite_url, k=1).start(), sqlite_url


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = ctx.new_page()
        dialogs: list[str] = []
        pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        pg.dialogs = dialogs  # type: ignore[attr-defined]
        try:
            yield pg
        finally:
            browser.close()


def test_annotate_three_items_with_keyboard(site, page, request):
    srv, url = site
    page.goto(srv.url + "/annotate")
    assert page.url.endswith("/login")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "alice-pass-1")
    page.click("button[type=submit]")
    page.wait_for_url("**/annotate")
    assert page.inner_text("#judged") == "0" and page.inner_text("#open") == "3"
    out = Path(
        os.environ.get("ALIGNFORGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "outputs" / "test-artifacts")
    )
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "annotator_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")
    # Enter without a choice does nothing but explain
    page.keyboard.press("Enter")
    assert "Choose an overall" in page.inner_text("#hint")
    keys = ["1", "4", "6"]
    for n, key in enumerate(keys, start=1):
        page.keyboard.press(key)
        assert page.is_checked(f"input[name=overall][data-key='{key}']")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        if n < 3:
            assert page.inner_text("#judged") == str(n)
            assert page.inner_text("#open") == str(3 - n)
        assert "Judgment recorded." in page.inner_text("#flash")
    assert "Nothing left" in page.content() and page.inner_text("#judged") == "3"
    assert page.dialogs == []
    engine, S = open_db(url, migrate=False)
    rows = svc.judged_rows(S)
    engine.dispose()
    assert sorted(r["judgment"].shown_overall for r in rows) == ["a2", "b1", "both_bad"]  # keys 1, 4, 6


def test_xss_payloads_execute_nothing_and_show_as_text(site, page):
    srv, _ = site
    page.goto(srv.url + "/login")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "alice-pass-1")
    page.click("button[type=submit]")
    page.wait_for_url("**/annotate")
    page.wait_for_load_state("load")
    left = page.locator("#resp-a") if "<img src=x" in page.inner_text("#resp-a") else page.locator("#resp-b")
    text = left.inner_text()
    for frag in (
        "<img src=x onerror=alert(1)>",
        "<script>alert('script')</script>",
        "<svg onload=alert('svg')></svg>",
        "<a href=\"javascript:alert('raw-a')\">raw anchor</a>",
    ):
        assert frag in text, frag
    assert "alert('js-link')" in text  # the javascript: link stays text
    for sel in ("main img", "main script", "main svg", "main iframe"):
        assert page.locator(sel).count() == 0, sel
    hrefs = page.eval_on_selector_all("main a", "els => els.map(e => e.getAttribute('href'))")
    assert all(h.startswith(("http://", "https://", "/")) for h in hrefs), hrefs
    # clicking every link in the item executes nothing
    for i in range(page.locator("#history a, .resp a").count()):
        page.locator("#history a, .resp a").nth(i).click(modifiers=["Control"], no_wait_after=True)
    page.wait_for_timeout(300)
    assert page.dialogs == []
    # history is shown, turn by turn
    assert page.locator("#history .msg").count() == 3
    assert page.locator("#history .msg.role-assistant em").inner_text() == "earlier"
