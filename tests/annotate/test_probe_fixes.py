"""Defects a black-box probe found (issue 15), each on SQLite and on a real PostgreSQL where the
backend matters: out-of-range ids, the admin page's counts, user-form validation, the last
admin, the lockout scheme and the database-held login limit, lease-bound submission tokens,
skips of another user's item, and re-imports with changed content."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select
from typer.testing import CliRunner

from alignforge.annotate import service as svc
from alignforge.annotate.app import AppConfig, create_app
from alignforge.annotate.cli import annotate_app
from alignforge.annotate.db import Assignment, Judgment, utcnow
from alignforge.errors import AlignforgeError

TOKEN_RE = re.compile(r'name="(csrf_token|assignment_id|submission_token)" value="([^"]*)"')
ATTACKER, BOB_HOME = ("203.0.113.9", 40000), ("198.51.100.7", 40001)
FORM = svc.JudgmentForm("a1", "clear")


def _make_app(url, tmp_path, pairs_writer, fast_hasher, n_items=3, gold=0, **cfg):
    a = create_app(AppConfig(url, k=2, login_max_failures=5, **cfg))
    S = a.state.S
    for name, pw, role in (
        ("ann", "password-1", "annotator"),
        ("ann2", "password-2", "annotator"),
        ("boss", "password-3", "admin"),
        ("bob", "bob-password", "annotator"),
    ):
        svc.create_user(S, name, pw, role, hasher=fast_hasher)
    svc.import_pairs(S, pairs_writer(tmp_path / "p.jsonl", n_items))
    if gold:
        svc.import_pairs(S, pairs_writer(tmp_path / "g.jsonl", gold, start=100, gold="a"))
    return a


@pytest.fixture
def app(db_url, tmp_path, pairs_writer, fast_hasher):
    a = _make_app(db_url, tmp_path, pairs_writer, fast_hasher)
    yield a
    a.state.engine.dispose()


def client(app, addr=("testclient", 50000)):
    return TestClient(app, follow_redirects=False, raise_server_exceptions=False, client=addr)


def try_login(c, user, pw):
    tok = TOKEN_RE.search(c.get("/login").text).group(2)
    return c.post("/login", data={"username": user, "password": pw, "csrf_token": tok})


def login(app, user, pw, addr=("testclient", 50000)):
    c = client(app, addr)
    r = try_login(c, user, pw)
    assert r.status_code == 303, (r.status_code, r.text[:300])
    return c


def fields(c):
    return dict(TOKEN_RE.findall(c.get("/annotate").text))


def n_judgments(S):
    with S() as s:
        return s.scalar(select(func.count()).select_from(Judgment))


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize("bad_id", [2**63, 2**63 - 1, 2**31, 0, -1, -(2**63) - 1])
def test_out_of_range_assignment_ids_get_4xx(app, bad_id):
    """2**63 overflowed SQLite's INTEGER (HTTP 500); 2**31 overflows PostgreSQL's."""
    c = login(app, "ann", "password-1")
    f = fields(c)
    for path, data in (("/annotate/submit", {**f, "overall": "a1", "prompt_quality": "clear"}), ("/annotate/skip", f)):
        r = c.post(path, data={**data, "assignment_id": str(bad_id)})
        assert r.status_code == 422, (path, r.status_code, r.text[:300])
        assert "invalid assignment id" in r.text
    assert n_judgments(app.state.S) == 0
    uid = next(u.id for u in svc.list_users(app.state.S) if u.username == "ann")
    # the service refuses such ids too, without touching the database driver
    assert svc.submit(app.state.S, uid, bad_id, f["submission_token"], FORM, k=2).status == "rejected"
    assert not svc.skip(app.state.S, uid, bad_id).accepted
    # the real form still works afterwards
    assert (
        c.post("/annotate/submit", data={**f, "overall": "a1", "prompt_quality": "clear"}).headers["location"]
        == "/annotate?m=ok"
    )


# --------------------------------------------------------------------------- admin pages


def test_admin_page_counts_gold_apart_and_leaks_no_address(sqlite_url, tmp_path, pairs_writer, fast_hasher):
    a = _make_app(sqlite_url, tmp_path, pairs_writer, fast_hasher, n_items=3, gold=1)
    try:
        for name, pw in (("ann", "password-1"), ("ann2", "password-2")):
            c = login(a, name, pw)
            for _ in range(4):  # 3 items + 1 gold item each
                f = fields(c)
                assert (
                    c.post("/annotate/submit", data={**f, "overall": "a1", "prompt_quality": "clear"}).headers[
                        "location"
                    ]
                    == "/annotate?m=ok"
                )
            assert 'id="judge-form"' not in c.get("/annotate").text
        boss = login(a, "boss", "password-3")
        page = boss.get("/admin").text
        prog = re.search(r'<p id="overall-progress">(.*?)</p>', page, re.S).group(1)
        assert "built-in method" not in page and not re.search(r"0x[0-9a-f]{6,}", page)
        assert "Items: 3 (+1 gold)" in prog
        # 6 judgments on the 3 items, k=2 each: 6 of 6 (the 2 gold judgments are counted apart)
        assert "judgments: 6 of 6 targeted (+2 on gold items)" in prog, prog
        agree = boss.get("/admin/agreement").text
        assert "built-in method" not in agree
        assert re.search(r"<td>ann</td><td>ann2</td><td>\d+</td>", agree), agree
        r = CliRunner().invoke(annotate_app, ["users", "list", "--db", sqlite_url, "--k", "2"])
        assert "judgments=6/6 (+2 on gold)" in r.output, r.output
    finally:
        a.state.engine.dispose()


@pytest.mark.parametrize("value", ["2", "true", "yes", "-1", "on", " 0"])
def test_user_update_rejects_invalid_active_values(sqlite_url, tmp_path, pairs_writer, fast_hasher, value):
    a = _make_app(sqlite_url, tmp_path, pairs_writer, fast_hasher)
    try:
        ann2 = login(a, "ann2", "password-2")
        boss = login(a, "boss", "password-3")
        csrf = TOKEN_RE.search(boss.get("/admin/users").text).group(2)
        r = boss.post(
            "/admin/users/update", data={"username": "ann2", "active": value, "role": "admin", "csrf_token": csrf}
        )
        assert r.status_code == 400 and "invalid value for active" in r.text, (r.status_code, r.text[:300])
        u = next(u for u in svc.list_users(a.state.S) if u.username == "ann2")
        assert u.active and u.role == "annotator"  # nothing changed, not even the role
        assert ann2.get("/annotate").status_code == 200  # still logged in
        r = boss.post("/admin/users/update", data={"username": "ann2", "active": "0", "csrf_token": csrf})
        assert r.status_code == 303
        assert ann2.get("/annotate").status_code == 303
    finally:
        a.state.engine.dispose()


def test_last_admin_cannot_demote_or_deactivate_itself(app, fast_hasher):
    S = app.state.S
    boss = login(app, "boss", "password-3")
    csrf = TOKEN_RE.search(boss.get("/admin/users").text).group(2)
    for data in ({"role": "annotator"}, {"active": "0"}):
        r = boss.post("/admin/users/update", data={"username": "boss", "csrf_token": csrf, **data})
        assert r.status_code == 400 and "last active admin" in r.text, (data, r.status_code)
    u = next(u for u in svc.list_users(S) if u.username == "boss")
    assert u.role == "admin" and u.active
    with pytest.raises(AlignforgeError, match="last active admin"):
        svc.set_user(S, "boss", role="annotator")
    # with a second admin, demoting one is fine
    svc.create_user(S, "boss2", "password-4", "admin", hasher=fast_hasher)
    r = boss.post("/admin/users/update", data={"username": "boss", "role": "annotator", "csrf_token": csrf})
    assert r.status_code == 303
    assert boss.get("/admin").status_code == 403
    with pytest.raises(AlignforgeError, match="last active admin"):
        svc.set_user(S, "boss2", active=False)


def test_two_admins_demoting_each_other_at_once_leave_one(db_url, fast_hasher):
    from alignforge.annotate.db import open_db

    engine, S = open_db(db_url)
    svc.create_user(S, "a1", "password-1", "admin", hasher=fast_hasher)
    svc.create_user(S, "a2", "password-2", "admin", hasher=fast_hasher)
    barrier, errors = threading.Barrier(2), []

    @event.listens_for(engine, "after_cursor_execute")
    def widen_the_race(conn, cursor, statement, params, context, executemany):
        # both threads would read "two admins" before either commits, were the rows not locked
        if statement.lstrip().startswith("SELECT users.id") and "users.role" in statement:
            time.sleep(0.3)

    def demote(name):
        barrier.wait()
        try:
            svc.set_user(S, name, role="annotator")
        except AlignforgeError as e:
            errors.append(str(e))

    ts = [threading.Thread(target=demote, args=(n,)) for n in ("a1", "a2")]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    admins = [u.username for u in svc.list_users(S) if u.role == "admin" and u.active]
    engine.dispose()
    assert len(admins) == 1 and len(errors) == 1 and "last active admin" in errors[0]


def test_cli_users_add_with_empty_password_is_a_clean_error(tmp_path):
    runner = CliRunner()
    db = f"sqlite:///{tmp_path / 'c.db'}"
    r = runner.invoke(annotate_app, ["users", "add", "x", "--db", db], env={"ALIGNFORGE_ANNOTATE_PASSWORD": ""})
    assert r.exit_code == 2 and "error: password too short" in r.output, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit)
    # no variable and nothing typed at the prompt: also a clean error, not an Abort
    r = runner.invoke(
        annotate_app, ["users", "add", "x", "--db", db], env={"ALIGNFORGE_ANNOTATE_PASSWORD": None}, input=""
    )
    assert r.exit_code == 2 and "error: no password given" in r.output, (r.exit_code, r.output)


# --------------------------------------------------------------------------- login limit


def test_lockout_is_per_name_and_address_so_strangers_cannot_lock_users(app):
    """5 wrong passwords for 'BOB' (no such user) from the attacker's address lock only the
    attacker's own address out of 'bob'; the real bob, elsewhere, still logs in."""
    attacker = client(app, ATTACKER)
    codes = [try_login(attacker, "BOB", f"guess-{i}").status_code for i in range(5)]
    assert codes == [401] * 5
    r = try_login(attacker, " bob ", "bob-password")  # same normalised name, same address
    assert r.status_code == 429 and "Retry-After" in r.headers
    login(app, "bob", "bob-password", BOB_HOME)
    # a success from bob's address does not lift the attacker's lock
    assert try_login(attacker, "bob", "guess-x").status_code == 429
    # and other names from the attacker's address are not locked by bob's bucket
    assert try_login(attacker, "ann", "password-1").status_code == 303


def test_login_limit_is_shared_by_servers_on_one_database(db_url, tmp_path, pairs_writer, fast_hasher):
    """Two app instances (two workers, or two servers) on one database share the limit; the
    per-address limit holds across user names too."""
    a1 = _make_app(db_url, tmp_path, pairs_writer, fast_hasher, login_ip_max_failures=8)
    a2 = create_app(AppConfig(db_url, k=2, login_max_failures=5, login_ip_max_failures=8))
    try:
        w1, w2 = client(a1, ATTACKER), client(a2, ATTACKER)
        assert [try_login(w, "ann", "nope-nope").status_code for w in (w1, w2, w1, w2, w1)] == [401] * 5
        assert try_login(w2, "ann", "password-1").status_code == 429
        assert try_login(w1, "ann", "password-1").status_code == 429
        # per address: 3 more failures on other names reach 8, then every name is refused
        assert [try_login(w, n, "nope-nope").status_code for w, n in ((w1, "x1"), (w2, "x2"), (w1, "x3"))] == [401] * 3
        assert try_login(w2, "ann2", "password-2").status_code == 429
        # the real ann from elsewhere is not affected
        login(a2, "ann", "password-1", BOB_HOME)
    finally:
        a1.state.engine.dispose()
        a2.state.engine.dispose()


def test_login_attempts_window_reset_and_concurrency(db_url):
    from alignforge.annotate.db import open_db

    engine, S = open_db(db_url)
    t0 = utcnow()
    b = [("user:1.2.3.4:carol", 3)]
    for i in range(3):
        wait, ids = svc.begin_login_attempt(S, b, 300, now=t0 + dt.timedelta(seconds=i))
        assert wait == 0 and len(ids) == 1
        svc.end_login_attempt(S, ids, ok=False)
    wait, ids = svc.begin_login_attempt(S, b, 300, now=t0 + dt.timedelta(seconds=10))
    assert ids == [] and wait == pytest.approx(290)
    # refused attempts do not extend the lock: it lifts when the oldest failure leaves the window
    wait, ids = svc.begin_login_attempt(S, b, 300, now=t0 + dt.timedelta(seconds=300.5))
    assert wait == 0 and ids
    svc.end_login_attempt(S, ids, ok=True, reset=("user:1.2.3.4:carol",))  # a success clears it
    for i in range(3):
        wait, ids = svc.begin_login_attempt(S, b, 300, now=t0 + dt.timedelta(seconds=301 + i))
        assert wait == 0
        svc.end_login_attempt(S, ids, ok=False)
    # concurrent failures: never more than the limit get through
    passed, barrier = [], threading.Barrier(10)
    bucket = [("user:5.6.7.8:dave", 3)]

    def attempt():
        barrier.wait()
        w, i = svc.begin_login_attempt(S, bucket, 300)
        if w == 0:
            passed.append(i)
            svc.end_login_attempt(S, i, ok=False)

    ts = [threading.Thread(target=attempt) for _ in range(10)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    engine.dispose()
    assert len(passed) <= 3, len(passed)


# --------------------------------------------------------------------------- tokens and skips


def test_submission_token_is_bound_to_its_lease(app):
    S = app.state.S
    c = login(app, "ann", "password-1")
    f = fields(c)
    made_up = {**f, "submission_token": "madeUpToken_123", "overall": "a1", "prompt_quality": "clear"}
    r = c.post("/annotate/submit", data=made_up)
    assert r.status_code == 409 and "invalid submission token" in r.text, (r.status_code, r.text[:300])
    assert n_judgments(S) == 0
    assert fields(c)["submission_token"] == f["submission_token"]  # the page keeps the lease's token
    uid = next(u.id for u in svc.list_users(S) if u.username == "ann")
    a = svc.claim_next(S, uid, k=2, lease_seconds=60)
    assert svc.submit(S, uid, a.id, a.submission_token, FORM, k=2).status == "ok"
    # the next lease's token differs; the old one does not work on it
    b = svc.claim_next(S, uid, k=2, lease_seconds=60)
    assert b.id != a.id and b.submission_token != a.submission_token
    res = svc.submit(S, uid, b.id, a.submission_token, FORM, k=2)
    assert res.status == "rejected" and "invalid submission token" in res.message
    assert n_judgments(S) == 1


def test_renewed_lease_keeps_its_token_and_old_leases_get_one(db_url, tmp_path, pairs_writer, fast_hasher):
    from alignforge.annotate.db import open_db

    engine, S = open_db(db_url)
    svc.import_pairs(S, pairs_writer(tmp_path / "p.jsonl", 2))
    svc.create_user(S, "u", "password-1", hasher=fast_hasher)
    uid = svc.list_users(S)[0].id
    a = svc.claim_next(S, uid, k=1, lease_seconds=60, now=utcnow() - dt.timedelta(seconds=600))
    b = svc.claim_next(S, uid, k=1, lease_seconds=60)  # the expired lease, renewed
    assert b.id == a.id and b.submission_token == a.submission_token
    with S.begin() as s:  # a lease issued before migration 0002 has no token
        s.get(Assignment, a.id).submission_token = None
    c = svc.claim_next(S, uid, k=1, lease_seconds=60)
    assert c.id == a.id and c.submission_token
    assert svc.submit(S, uid, c.id, c.submission_token, FORM, k=1).status == "ok"
    engine.dispose()


def test_skipping_another_users_item_says_so(app):
    S = app.state.S
    ann = login(app, "ann", "password-1")
    f = fields(ann)
    ann2 = login(app, "ann2", "password-2")
    f2 = fields(ann2)
    r = ann2.post("/annotate/skip", data={"csrf_token": f2["csrf_token"], "assignment_id": f["assignment_id"]})
    assert r.status_code == 409 and "not assigned to you" in r.text and "Item skipped." not in r.text
    with S() as s:
        assert s.get(Assignment, int(f["assignment_id"])).status == "active"
    assert fields(ann)["assignment_id"] == f["assignment_id"]
    # the user's own skip works, once
    r = ann.post("/annotate/skip", data={"csrf_token": f["csrf_token"], "assignment_id": f["assignment_id"]})
    assert r.headers["location"] == "/annotate?m=skip"
    r = ann.post("/annotate/skip", data={"csrf_token": f["csrf_token"], "assignment_id": f["assignment_id"]})
    assert r.status_code == 409 and "already skipped" in r.text
    assert fields(ann)["assignment_id"] != f["assignment_id"]


# --------------------------------------------------------------------------- re-imports


def test_reimport_with_changed_content_is_reported_per_line(db, tmp_path, pairs_writer):
    p = pairs_writer(tmp_path / "p.jsonl", 3)
    svc.import_pairs(db, p)
    lines = p.read_text().splitlines()
    lines[1] = lines[1].replace("short answer 1", "a corrected answer 1")
    lines[2] = lines[2].replace('"id": "item-2"', '"id": "item-2", "gold": "b", "category": "c"')
    p2 = tmp_path / "p2.jsonl"
    p2.write_text("\n".join(lines + [lines[0].replace("item-0", "item-9")]) + "\n")
    rep = svc.import_pairs(db, p2)
    assert (rep.read, rep.added, rep.skipped_existing) == (4, 1, 3)
    assert [(e.file, e.line, e.field) for e in rep.conflicts] == [(str(p2), 2, "id"), (str(p2), 3, "id")]
    assert "different response_a" in rep.conflicts[0].reason
    assert "different category, gold" in rep.conflicts[1].reason
    s = rep.summary()
    assert "2 of them with different content" in s
    assert f"{p2}:2: field 'id': id 'item-1' is already imported with a different response_a" in s
    with db() as s:
        from alignforge.annotate.db import Item

        it = s.scalar(select(Item).where(Item.uid == "item-1"))
        assert it.response_a == "short answer 1"  # the stored content is kept
    r = CliRunner().invoke(annotate_app, ["import", str(p2), "--db", str(db.kw["bind"].url)])
    assert r.exit_code == 0 and f"{p2}:3: field 'id'" in r.output, r.output
    # an unchanged re-import reports nothing
    assert svc.import_pairs(db, p).conflicts == []


def test_serve_help_says_where_the_login_limit_lives():
    r = CliRunner().invoke(annotate_app, ["serve", "--help"], env={"COLUMNS": "200"})
    text = " ".join(r.output.split())
    assert r.exit_code == 0
    assert "rate-limited in the database" in text and "(user name, client address)" in text
