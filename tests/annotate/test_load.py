"""Load and fault tests against the real server (uvicorn subprocess on 127.0.0.1), on SQLite
and on the suite's throwaway PostgreSQL server.

50 simulated annotators each submit 20 judgments concurrently (k=3). Nothing may be lost
or duplicated and no item may get more than k judgments. The fault test kills the server
with SIGKILL in the middle of that load, restarts it, lets the clients retry what failed
(same submission tokens), and checks that every judgment whose request got a success
response is in the database.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import select

from alignforge.annotate import service as svc
from alignforge.annotate.db import Assignment, Judgment, User, open_db

N_USERS, PER_USER, K = 50, 20, 3
N_ITEMS = N_USERS * PER_USER // K + 20
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(params=["sqlite", "postgresql"])
def loaded_db(request, tmp_path, pairs_writer, fast_hasher):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    engine, S = open_db(url)
    svc.import_pairs(S, pairs_writer(tmp_path / "p.jsonl", N_ITEMS))
    for i in range(N_USERS):
        svc.create_user(S, f"load{i:02d}", "password-123", hasher=fast_hasher)
    engine.dispose()
    return url


def run_load(url, annotator_cls, retry_s=0.0, on_progress=None, deadline_s=180):
    acked: list[tuple[str, str]] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(N_USERS)

    def client(i):
        name = f"load{i:02d}"
        a = annotator_cls(url, name, "password-123", retry_s=retry_s)
        rng = random.Random(i)
        try:
            a.login()
            barrier.wait()
            for _ in range(PER_USER):
                f = a.next_item()
                if f is None:
                    failures.append(f"{name}: no item left")
                    return
                r = a.submit(f, overall=rng.choice(["a2", "a1", "tie", "b1", "b2", "both_bad"]))
                loc = r.headers.get("location", "")
                if r.status_code == 303 and loc.startswith("/annotate?m=") and loc[12:] in ("ok", "dup", "late"):
                    with lock:
                        acked.append((name, f["submission_token"]))
                else:
                    failures.append(f"{name}: {r.status_code} {r.text[:200]}")
                if on_progress:
                    on_progress(len(acked))
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"{name}: {type(e).__name__}: {e}")
        finally:
            a.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(N_USERS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline_s - (time.monotonic() - t0)))
    assert not any(t.is_alive() for t in threads), "clients did not finish in time"
    return acked, failures, time.monotonic() - t0


def check_db(url, acked):
    engine, S = open_db(url, migrate=False)
    with S() as s:
        rows = s.execute(
            select(
                Judgment.submission_token,
                Judgment.item_id,
                User.username,
                Assignment.submission_token.label("lease_token"),
            )
            .join(User, User.id == Judgment.user_id)
            .join(Assignment, Assignment.id == Judgment.assignment_id)
        ).all()
    engine.dispose()
    tokens = {r.submission_token for r in rows}
    missing = [t for _, t in acked if t not in tokens]
    assert not missing, f"{len(missing)} acknowledged judgments lost"
    assert len(rows) == N_USERS * PER_USER  # nothing lost, nothing extra
    assert len({t for _, t in acked}) == N_USERS * PER_USER  # every acknowledgement distinct
    per_item = Counter(r.item_id for r in rows)
    assert max(per_item.values()) <= K
    per_user = Counter(r.username for r in rows)
    assert set(per_user.values()) == {PER_USER}
    assert len({(r.item_id, r.username) for r in rows}) == len(rows)
    assert all(r.submission_token == r.lease_token for r in rows)  # each under its own lease's token
    return rows


def test_load_50_annotators_x_20(loaded_db, server_factory, annotator_cls):
    srv = server_factory(loaded_db, k=K).start()
    acked, failures, secs = run_load(srv.url, annotator_cls)
    srv.stop()
    assert not failures, failures[:5]
    check_db(loaded_db, acked)
    print(f"\nload: {len(acked)} judgments by {N_USERS} annotators in {secs:.1f} s ({len(acked) / secs:.0f}/s)")


def test_kill9_mid_load_loses_no_acknowledged_judgment(loaded_db, server_factory, annotator_cls):
    srv = server_factory(loaded_db, k=K).start()
    state = {"killed_at": None}
    killed = threading.Event()

    def killer():
        while not killed.is_set():
            time.sleep(0.02)
            if state.get("n", 0) >= 300:
                srv.kill9()
                state["killed_at"] = state["n"]
                killed.set()
                time.sleep(0.5)
                srv.start()

    kt = threading.Thread(target=killer, daemon=True)
    kt.start()
    acked, failures, secs = run_load(
        srv.url, annotator_cls, retry_s=60, on_progress=lambda n: state.__setitem__("n", n)
    )
    killed.set()
    kt.join(30)
    srv.stop()
    assert state["killed_at"] is not None and state["killed_at"] < N_USERS * PER_USER
    assert not failures, failures[:5]
    check_db(loaded_db, acked)
    print(f"\nfault: killed after {state['killed_at']} acks; {len(acked)} judgments in {secs:.1f} s")
