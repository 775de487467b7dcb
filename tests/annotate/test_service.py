"""Leases, k, idempotent append-only judgments: on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter

import pytest
from sqlalchemy import delete, func, select, update

from alignforge.annotate import service as svc
from alignforge.annotate.db import AppendOnlyError, Judgment, open_db, utcnow

FORM = svc.JudgmentForm("a1", "clear", helpfulness="a", harmlessness="same", fluency="b")


@pytest.fixture
def S(db_url, tmp_path, pairs_writer, fast_hasher):
    engine, S = open_db(db_url)
    svc.import_pairs(S, pairs_writer(tmp_path / "p.jsonl", 6))
    for i in range(12):
        svc.create_user(S, f"u{i}", "password-123", hasher=fast_hasher)
    yield S
    engine.dispose()


def uid(S, name):
    return next(u.id for u in svc.list_users(S) if u.username == name)


def counts(S):
    with S() as s:
        per_item = Counter(s.scalars(select(Judgment.item_id)))
        return per_item, s.scalar(select(func.count()).select_from(Judgment))


def test_claim_submit_flow_stores_canonical_orientation(S):
    u = uid(S, "u0")
    a = svc.claim_next(S, u, k=2, lease_seconds=60)
    assert a is not None
    assert svc.claim_next(S, u, k=2, lease_seconds=60).id == a.id  # same lease until judged
    res = svc.submit(S, u, a.id, a.submission_token, FORM, k=2)
    assert res.status == "ok" and not res.late
    with S() as s:
        j = s.scalar(select(Judgment))
    # "A > B" as displayed; if the display was swapped, response_b is the one preferred
    assert j.overall == (-1 if a.swapped else 1)
    assert j.helpfulness == (-1 if a.swapped else 1) and j.harmlessness == 0
    assert j.fluency == (1 if a.swapped else -1) and j.shown_overall == "a1"
    nxt = svc.claim_next(S, u, k=2, lease_seconds=60)
    assert nxt.item_id != a.item_id
    assert svc.user_progress(S, u, k=2) == {"judged": 1, "open": 5}


def test_double_submit_records_one_judgment(S):
    u = uid(S, "u0")
    a = svc.claim_next(S, u, k=2, lease_seconds=60)
    r1 = svc.submit(S, u, a.id, a.submission_token, FORM, k=2)
    r2 = svc.submit(S, u, a.id, a.submission_token, FORM, k=2)
    assert (r1.status, r2.status) == ("ok", "duplicate") and r1.judgment_id == r2.judgment_id
    r3 = svc.submit(S, u, a.id, "other-token", FORM, k=2)
    assert r3.status == "rejected" and "invalid submission token" in r3.message
    # another user cannot reuse the token or submit on someone else's assignment
    v = uid(S, "u1")
    assert svc.submit(S, v, a.id, a.submission_token, FORM, k=2).status == "rejected"
    assert svc.submit(S, v, a.id, "x-token", FORM, k=2).status == "rejected"
    assert counts(S)[1] == 1


def test_concurrent_double_submit_same_token(S):
    u = uid(S, "u0")
    a = svc.claim_next(S, u, k=2, lease_seconds=60)
    results = []
    barrier = threading.Barrier(6)

    def go():
        barrier.wait()
        results.append(svc.submit(S, u, a.id, a.submission_token, FORM, k=2).status)

    ts = [threading.Thread(target=go) for _ in range(6)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert sorted(results) == ["duplicate"] * 5 + ["ok"]
    assert counts(S)[1] == 1


def test_k_never_exceeded_under_concurrent_claims(S):
    k = 2
    barrier = threading.Barrier(12)
    claimed: dict[int, list[int]] = {}

    def worker(i):
        u = uid(S, f"u{i}")
        barrier.wait()
        got = []
        while True:
            a = svc.claim_next(S, u, k=k, lease_seconds=60)
            if a is None:
                break
            got.append(a.item_id)
            assert svc.submit(S, u, a.id, a.submission_token, FORM, k=k).status == "ok"
        claimed[i] = got

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    per_item, total = counts(S)
    assert total == 6 * k and set(per_item.values()) == {k}
    for got in claimed.values():
        assert len(got) == len(set(got))  # nobody judged an item twice


def test_active_leases_count_towards_k(S):
    now = utcnow()
    a0 = svc.claim_next(S, uid(S, "u0"), k=1, lease_seconds=60, now=now)
    a1 = svc.claim_next(S, uid(S, "u1"), k=1, lease_seconds=60, now=now)
    assert a0.item_id != a1.item_id
    # after u0's lease expires, the item is free again
    later = now + dt.timedelta(seconds=61)
    got = [svc.claim_next(S, uid(S, f"u{i}"), k=1, lease_seconds=60, now=later).item_id for i in range(2, 7)]
    assert a0.item_id in got


def test_expired_lease_late_submission(S):
    """Accepted once if the item still has a place; rejected with a message when it was
    reassigned to someone else; never counted twice."""
    u0, u1 = uid(S, "u0"), uid(S, "u1")
    t0 = utcnow() - dt.timedelta(seconds=600)
    a = svc.claim_next(S, u0, k=1, lease_seconds=60, now=t0)
    # nobody took the item meanwhile: the late submission is accepted (marked late), once
    r = svc.submit(S, u0, a.id, a.submission_token, FORM, k=1)
    assert r.status == "ok" and r.late
    assert svc.submit(S, u0, a.id, a.submission_token, FORM, k=1).status == "duplicate"
    # second case: the item was given to u1 after u0's lease expired
    b = svc.claim_next(S, u0, k=1, lease_seconds=60, now=t0)
    b1 = svc.claim_next(S, u1, k=1, lease_seconds=60)
    assert b1.item_id == b.item_id
    r = svc.submit(S, u0, b.id, b.submission_token, FORM, k=1)
    assert r.status == "rejected" and "expired" in r.message
    assert svc.submit(S, u1, b1.id, b1.submission_token, FORM, k=1).status == "ok"
    per_item, total = counts(S)
    assert total == 2 and max(per_item.values()) == 1


def test_skip_gives_item_back(S):
    u0, u1 = uid(S, "u0"), uid(S, "u1")
    a = svc.claim_next(S, u0, k=1, lease_seconds=60)
    assert svc.skip(S, u0, a.id).accepted
    assert not svc.skip(S, u1, a.id).accepted  # not u1's lease
    assert svc.claim_next(S, u1, k=1, lease_seconds=60).item_id == a.item_id
    assert svc.claim_next(S, u0, k=1, lease_seconds=60).item_id != a.item_id
    assert svc.submit(S, u0, a.id, a.submission_token, FORM, k=1).status == "rejected"


def test_judgments_are_append_only(S):
    u = uid(S, "u0")
    a = svc.claim_next(S, u, k=2, lease_seconds=60)
    assert svc.submit(S, u, a.id, a.submission_token, FORM, k=2).status == "ok"
    with S() as s:
        j = s.scalar(select(Judgment))
        j.overall = -2
        with pytest.raises(AppendOnlyError):
            s.commit()
        s.rollback()
    with S() as s:
        s.delete(s.scalar(select(Judgment)))
        with pytest.raises(AppendOnlyError):
            s.commit()
        s.rollback()
    with S() as s:
        with pytest.raises(AppendOnlyError):
            s.execute(update(Judgment).values(overall=0))
        with pytest.raises(AppendOnlyError):
            s.execute(delete(Judgment))
    with S() as s:
        assert s.scalar(select(Judgment.overall)) == (-1 if a.swapped else 1)


def test_invalid_forms_rejected(S):
    u = uid(S, "u0")
    a = svc.claim_next(S, u, k=2, lease_seconds=60)
    for form in (
        svc.JudgmentForm("", "clear"),
        svc.JudgmentForm("a1", "nope"),
        svc.JudgmentForm("a1", "clear", fluency="x"),
        svc.JudgmentForm("a1", "clear", comment="x" * 6000),
    ):
        assert svc.submit(S, u, a.id, a.submission_token, form, k=2).status == "rejected"
    assert svc.submit(S, u, a.id, "bad token!", FORM, k=2).status == "rejected"
    assert counts(S)[1] == 0


def test_gold_items_go_to_everyone_and_measure_accuracy(db, tmp_path, pairs_writer, fast_hasher):
    S = db
    pairs_writer(tmp_path / "g.jsonl", 1, start=100, gold="a")
    svc.import_pairs(S, tmp_path / "g.jsonl")
    for i in range(3):
        svc.create_user(S, f"g{i}", "password-123", hasher=fast_hasher)
    for i in range(3):
        u = uid(S, f"g{i}")
        a = svc.claim_next(S, u, k=1, lease_seconds=60)
        assert a is not None  # k=1 does not apply to gold items
        shown = "a1" if (i == 0) != a.swapped else "b1"  # g0 right, others wrong
        svc.submit(S, u, a.id, a.submission_token, svc.JudgmentForm(shown, "clear"), k=1)
    prog = {p.username: p for p in svc.all_progress(S, 1)["users"]}
    assert prog["g0"].gold_accuracy == 1.0 and prog["g1"].gold_accuracy == 0.0
    assert prog["g2"].gold_judged == 1
