"""HTTP-level security and pages (FastAPI TestClient, no server process)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from alignforge.annotate import service as svc
from alignforge.annotate.app import CSP, AppConfig, create_app, route_roles

TOKEN_RE = re.compile(r'name="(csrf_token|assignment_id|submission_token)" value="([^"]*)"')
XSS = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "[click](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    '<a href="javascript:alert(1)">y</a>',
    "![i](http://evil/x.png)",
]


@pytest.fixture
def app(sqlite_url, tmp_path, pairs_writer, fast_hasher):
    a = create_app(AppConfig(sqlite_url, k=2, login_max_failures=3))
    S = a.state.S
    svc.create_user(S, "ann", "password-1", "annotator", hasher=fast_hasher)
    svc.create_user(S, "ann2", "password-2", "annotator", hasher=fast_hasher)
    svc.create_user(S, "boss", "password-3", "admin", hasher=fast_hasher)
    pairs_writer(tmp_path / "p.jsonl", 3, response_a=" ".join(XSS))
    svc.import_pairs(S, tmp_path / "p.jsonl")
    yield a
    a.state.engine.dispose()


def login(app, user, pw):
    c = TestClient(app, follow_redirects=False)
    tok = TOKEN_RE.search(c.get("/login").text).group(2)
    r = c.post("/login", data={"username": user, "password": pw, "csrf_token": tok})
    assert r.status_code == 303, r.text
    return c, r


def fields(c):
    return dict(TOKEN_RE.findall(c.get("/annotate").text))


def test_security_headers_and_cookie_flags(app):
    c, r = login(app, "ann", "password-1")
    cookie = r.headers["set-cookie"]
    assert "af_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    for path in ("/login", "/annotate", "/static/app.js"):
        h = c.get(path).headers
        assert h["content-security-policy"] == CSP and h["x-content-type-options"] == "nosniff"
    assert "img-src 'none'" in CSP and "script-src 'self'" in CSP
    page = c.get("/annotate").text
    assert "<script>" not in page and "onerror" not in page.replace("onerror=alert(1)&gt;", "")
    assert not re.search(r"<script(?![^>]*src=\"/static/app.js\")", page)  # only our static JS
    assert "<img" not in page and not re.search(r"<a [^>]*href=\"javascript", page, re.I)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_every_route_checks_the_role(app):
    roles = route_roles(app)
    anon = TestClient(app, follow_redirects=False)
    ann, _ = login(app, "ann", "password-1")
    boss, _ = login(app, "boss", "password-3")
    checked = 0
    for key, kind in roles.items():
        method, path = key.split(" ", 1)
        if kind == "public":
            continue
        path = path.replace("{kind}", "raw")
        r = anon.request(method, path)
        assert r.status_code in (303, 401), key
        if method == "GET":
            assert r.headers["location"] == "/login"
        if path.startswith("/admin"):
            r = ann.request(method, path, data={"csrf_token": fields(ann)["csrf_token"]})
            assert r.status_code == 403, key  # an annotator never reaches admin pages/exports
            assert boss.request(method, path).status_code != 403 or method == "POST"
        checked += 1
    assert checked >= 10
    assert {"GET /admin/export/{kind}.jsonl", "GET /admin/agreement", "POST /annotate/submit"} <= set(roles)


def test_csrf_required_on_every_form(app):
    c, _ = login(app, "ann", "password-1")
    f = fields(c)
    for path, data in [
        ("/annotate/submit", {**f, "overall": "a1", "prompt_quality": "clear"}),
        ("/annotate/skip", f),
        ("/logout", {}),
    ]:
        bad = {**data, "csrf_token": "forged"}
        assert c.post(path, data=bad).status_code == 403, path
        nocsrf = {k: v for k, v in data.items() if k != "csrf_token"}
        assert c.post(path, data=nocsrf).status_code == 403, path
    # login form: double-submit cookie
    anon = TestClient(app, follow_redirects=False)
    anon.get("/login")
    r = anon.post("/login", data={"username": "ann", "password": "password-1", "csrf_token": "x"})
    assert r.status_code == 403
    boss, _ = login(app, "boss", "password-3")
    r = boss.post(
        "/admin/users", data={"username": "eve", "password": "password-9", "role": "admin", "csrf_token": "nope"}
    )
    assert r.status_code == 403 and "eve" not in [u.username for u in svc.list_users(app.state.S)]


def test_login_rate_limited(app):
    anon = TestClient(app, follow_redirects=False)
    tok = TOKEN_RE.search(anon.get("/login").text).group(2)
    codes = [
        anon.post("/login", data={"username": "ann", "password": "wrong-pass", "csrf_token": tok}).status_code
        for _ in range(4)
    ]
    assert codes == [401, 401, 401, 429]
    # even the right password is refused while limited; other users are not affected
    r = anon.post("/login", data={"username": "ann", "password": "password-1", "csrf_token": tok})
    assert r.status_code == 429 and "Retry-After" in r.headers
    login(app, "ann2", "password-2")


def test_annotate_submit_double_and_progress(app):
    c, _ = login(app, "ann", "password-1")
    page = c.get("/annotate").text
    assert 'id="judged">0<' in page and 'id="open">3<' in page
    f = dict(TOKEN_RE.findall(page))
    data = {**f, "overall": "b2", "prompt_quality": "unanswerable", "fluency": "a", "comment": "hm"}
    r1, r2 = c.post("/annotate/submit", data=data), c.post("/annotate/submit", data=data)
    assert r1.headers["location"] == "/annotate?m=ok" and r2.headers["location"] == "/annotate?m=dup"
    page = c.get("/annotate?m=ok").text
    assert 'id="judged">1<' in page and "Judgment recorded." in page
    r = c.post("/annotate/submit", data={**dict(TOKEN_RE.findall(page)), "prompt_quality": "clear"})
    assert r.status_code == 422 and "overall" in r.text
    rows = svc.judged_rows(app.state.S)
    assert len(rows) == 1 and rows[0]["judgment"].prompt_quality == "unanswerable"


def test_annotator_cannot_see_others_judgments_admin_can(app):
    a1, _ = login(app, "ann", "password-1")
    f = fields(a1)
    a1.post("/annotate/submit", data={**f, "overall": "a1", "prompt_quality": "clear", "comment": "SECRET-COMMENT"})
    a2, _ = login(app, "ann2", "password-2")
    for path in (
        "/annotate",
        "/admin",
        "/admin/agreement",
        "/admin/export/raw.jsonl",
        "/admin/export/trl.jsonl",
        "/admin/users",
    ):
        assert "SECRET-COMMENT" not in a2.get(path).text
    assert a2.get("/admin/export/raw.jsonl").status_code == 403
    boss, _ = login(app, "boss", "password-3")
    raw = boss.get("/admin/export/raw.jsonl")
    assert raw.status_code == 200 and "SECRET-COMMENT" in raw.text
    for path in (
        "/admin",
        "/admin/agreement",
        "/admin/users",
        "/admin/export/trl.jsonl?method=bt",
        "/admin/export/pointwise.jsonl",
        "/admin/export/ties.jsonl",
    ):
        assert boss.get(path).status_code == 200, path
    assert boss.get("/admin/export/evil.jsonl").status_code == 404
    # admin creates a user through the form
    csrf = TOKEN_RE.search(boss.get("/admin/users").text).group(2)
    r = boss.post(
        "/admin/users", data={"username": "new1", "password": "password-9", "role": "annotator", "csrf_token": csrf}
    )
    assert r.status_code == 303 and "new1" in boss.get("/admin/users").text
    r = boss.post("/admin/users/update", data={"username": "ann2", "active": "0", "csrf_token": csrf})
    assert r.status_code == 303
    assert a2.get("/annotate").status_code == 303  # deactivated: logged out


def test_app_module_does_not_import_torch():
    code = (
        "import sys; import alignforge.annotate.app, alignforge.annotate.cli, "
        "alignforge.annotate.export, alignforge.annotate.agreement; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad; print('clean')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr
