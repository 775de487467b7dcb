"""The annotation app's logic, independent of HTTP: users, sessions, import, leases, judgments.

Assignment rules (see :func:`claim_next`): every non-gold item goes to at most ``k``
annotators. An annotator holds an item through a lease (an :class:`Assignment` row with
``lease_expires_at``); a lease that is active and unexpired, or a recorded judgment, takes
one of the item's ``k`` places. Claims and submissions lock the item (SQLite: the whole
database through ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR UPDATE`` on the item
row) and re-count inside the lock, so ``k`` is never exceeded under concurrency. Gold
items (known answer) go to every annotator, outside ``k``, to measure accuracy.

Submissions are idempotent: each lease is issued a random ``submission_token`` (stored on
the assignment, unique in the judgments table) and a submission is accepted only with the
token of its own lease, so a double click or a retry after a lost response records one
judgment and a made-up token records none. A submission whose lease has expired is accepted if the item still has a free
place (it is marked ``late``), otherwise it is rejected with a message; either way it is
recorded at most once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from alignforge.annotate.db import (
    PROMPT_QUALITY,
    ROLES,
    Assignment,
    AuthSession,
    Item,
    Judgment,
    LoginAttempt,
    User,
    utcnow,
)
from alignforge.errors import AlignforgeError, DataError

# displayed overall choice -> score on the displayed A/B orientation; None = both bad
OVERALL_CHOICES: dict[str, int | None] = {"a2": 2, "a1": 1, "tie": 0, "b1": -1, "b2": -2, "both_bad": None}
OVERALL_LABELS = {"a2": "A ≫ B", "a1": "A > B", "tie": "Tie", "b1": "B > A", "b2": "B ≫ A", "both_bad": "Both bad"}
CRITERIA = ("helpfulness", "harmlessness", "fluency")
CRITERION_CHOICES: dict[str, int | None] = {"a": 1, "same": 0, "b": -1, "": None}
PROMPT_QUALITY_LABELS = {
    "clear": "Clear intent",
    "unclear_intent": "Unclear intent",
    "unclear_semantics": "Unclear semantics",
    "unanswerable": "Unanswerable",
}
MAX_COMMENT = 5000
SESSION_HOURS = 12
MAX_ID = 2**31 - 1  # ids are INTEGER columns: 32-bit on PostgreSQL


def valid_id(x: Any) -> bool:
    """Whether ``x`` can be a row id (a positive int that fits the column on every backend)."""
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_ID


# --------------------------------------------------------------------------- passwords

_DEFAULT_HASHER: Any = None
_DUMMY_HASH: str | None = None


def password_hasher(fast: bool = False) -> Any:
    """Argon2id hasher: the library defaults, or cheap parameters (tests only)."""
    from argon2 import PasswordHasher

    if fast:
        return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    global _DEFAULT_HASHER
    if _DEFAULT_HASHER is None:
        _DEFAULT_HASHER = PasswordHasher()
    return _DEFAULT_HASHER


def hash_password(password: str, hasher: Any = None) -> str:
    return (hasher or password_hasher()).hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Argon2 verification (parameters come from the stored hash). ``stored=None`` still
    spends the time of a verification, so unknown user names are not revealed by timing."""
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    global _DUMMY_HASH
    if stored is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = password_hasher().hash(secrets.token_hex(8))
        stored, password = _DUMMY_HASH, password + "\x00never"
    try:
        return PasswordHasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


# --------------------------------------------------------------------------- users


def _check_username(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name):
        raise AlignforgeError(f"invalid user name {name!r}: use 1-64 letters, digits or ._-@")
    return name


def create_user(
    S: sessionmaker[Session], username: str, password: str, role: str = "annotator", hasher: Any = None
) -> User:
    username = _check_username(username)
    if role not in ROLES:
        raise AlignforgeError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if len(password) < 8:
        raise AlignforgeError("password too short: at least 8 characters")
    with S.begin() as s:
        if s.scalar(select(User.id).where(User.username == username)) is not None:
            raise AlignforgeError(f"user {username!r} already exists")
        u = User(username=username, password_hash=hash_password(password, hasher), role=role, active=True)
        s.add(u)
    return u


def set_user(
    S: sessionmaker[Session],
    username: str,
    *,
    password: str | None = None,
    role: str | None = None,
    active: bool | None = None,
    hasher: Any = None,
) -> User:
    """Change a user; all or nothing. Refuses to demote or deactivate the last active admin
    (the admin rows are locked, so two admins demoting each other at once cannot both win)."""
    if role is not None and role not in ROLES:
        raise AlignforgeError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if active is not None and not isinstance(active, bool):
        raise AlignforgeError(f"invalid active flag {active!r} (expected true or false)")
    if password is not None and len(password) < 8:
        raise AlignforgeError("password too short: at least 8 characters")
    with S.begin() as s:
        u = s.scalar(select(User).where(User.username == username))
        if u is None:
            raise AlignforgeError(f"no such user: {username!r}")
        loses_admin = u.role == "admin" and u.active and ((role is not None and role != "admin") or active is False)
        if loses_admin:
            admins = list(
                s.scalars(
                    select(User.id)
                    .where(User.role == "admin", User.active.is_(True))
                    .order_by(User.id)
                    .with_for_update()
                )
            )
            if admins == [u.id]:
                raise AlignforgeError(f"{username!r} is the last active admin: make another user admin first")
        if password is not None:
            u.password_hash = hash_password(password, hasher)
        if role is not None:
            u.role = role
        if active is not None:
            u.active = active
        if password is not None or active is False:  # log out everywhere
            for sess in s.scalars(select(AuthSession).where(AuthSession.user_id == u.id)):
                s.delete(sess)
    return u


def list_users(S: sessionmaker[Session]) -> list[User]:
    with S() as s:
        return list(s.scalars(select(User).order_by(User.id)))


def authenticate(S: sessionmaker[Session], username: str, password: str) -> User | None:
    with S() as s:
        u = s.scalar(select(User).where(User.username == username.strip()))
    ok = verify_password(u.password_hash if u is not None else None, password)
    return u if ok and u is not None and u.active else None


# --------------------------------------------------------------------------- sessions


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(S: sessionmaker[Session], user: User) -> str:
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with S.begin() as s:
        s.add(
            AuthSession(
                token_hash=_token_hash(token),
                user_id=user.id,
                csrf_token=secrets.token_urlsafe(32),
                created_at=now,
                expires_at=now + dt.timedelta(hours=SESSION_HOURS),
            )
        )
    return token


def get_session(S: sessionmaker[Session], token: str | None) -> tuple[User, AuthSession] | None:
    if not token or len(token) > 128:
        return None
    with S() as s:
        sess = s.get(AuthSession, _token_hash(token))
        if sess is None or sess.expires_at <= utcnow():
            return None
        u = s.get(User, sess.user_id)
        if u is None or not u.active:
            return None
        return u, sess


def delete_session(S: sessionmaker[Session], token: str | None) -> None:
    if not token:
        return
    with S.begin() as s:
        sess = s.get(AuthSession, _token_hash(token))
        if sess is not None:
            s.delete(sess)


# --------------------------------------------------------------------------- login rate limit


def _bucket_hash(bucket: str) -> str:
    return hashlib.sha256(bucket.encode("utf-8", "surrogatepass")).hexdigest()


def login_buckets(username: str, client: str) -> tuple[str, str]:
    """The two rate-limit buckets of a login attempt: ``(user name, client address)`` and the
    client address alone. The name is normalised (stripped, case-folded); the address is
    part of the first bucket, so failures from one address never lock the account for
    anyone at another address."""
    return f"user:{client}:{username.strip().casefold()}", f"ip:{client}"


def begin_login_attempt(
    S: sessionmaker[Session], buckets: list[tuple[str, int]], window_s: float, now: dt.datetime | None = None
) -> tuple[float, list[int]]:
    """Reserve one attempt in each ``(bucket, limit)``, in the database (so the limit holds
    across worker processes and servers). Returns ``(wait_s, ids)``: ``wait_s > 0`` when a
    bucket already holds ``limit`` attempts in the last ``window_s`` seconds (nothing is
    reserved then); otherwise the ids to pass to :func:`end_login_attempt`.

    The reservation is committed before the count, so of any number of concurrent attempts
    at most ``limit`` get through: the last one to commit sees all the others."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=window_s)
    hashed = [(_bucket_hash(b), limit) for b, limit in buckets]
    with S.begin() as s:
        s.execute(delete(LoginAttempt).where(LoginAttempt.at <= cutoff))
        rows = [LoginAttempt(key_hash=h, at=now) for h, _ in hashed]
        s.add_all(rows)
        s.flush()
        ids = [r.id for r in rows]
    wait = 0.0
    with S() as s:
        for (h, limit), mine in zip(hashed, ids, strict=True):
            n, oldest = s.execute(
                select(func.count(), func.min(LoginAttempt.at)).where(
                    LoginAttempt.key_hash == h, LoginAttempt.at > cutoff, LoginAttempt.id != mine
                )
            ).one()
            if n >= limit and oldest is not None:
                wait = max(wait, (oldest + dt.timedelta(seconds=window_s) - now).total_seconds(), 0.001)
    if wait > 0:
        end_login_attempt(S, ids, ok=True)  # a refused attempt is not counted
        return wait, []
    return 0.0, ids


def end_login_attempt(S: sessionmaker[Session], ids: list[int], ok: bool, reset: tuple[str, ...] = ()) -> None:
    """After the password check: a failure keeps the reserved attempts (they count until
    they leave the window); a success deletes them and clears the buckets in ``reset``."""
    if not ok:
        return
    with S.begin() as s:
        if ids:
            s.execute(delete(LoginAttempt).where(LoginAttempt.id.in_(ids)))
        if reset:
            s.execute(delete(LoginAttempt).where(LoginAttempt.key_hash.in_([_bucket_hash(b) for b in reset])))


# --------------------------------------------------------------------------- import


@dataclass
class PairRecord:
    uid: str
    prompt: list[dict]
    response_a: str
    response_b: str
    category: str | None = None
    gold_overall: int | None = None
    source: str | None = None
    line: int | None = None


GOLD_VALUES: dict[str, int] = {"a2": 2, "a": 1, "a1": 1, "tie": 0, "b": -1, "b1": -1, "b2": -2}


def _content_uid(prompt: list[dict], a: str, b: str) -> str:
    blob = json.dumps([prompt, a, b], ensure_ascii=False, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def parse_pair(obj: Any, fname: str, line: int) -> PairRecord:
    """One import record: either ``{prompt, response_a, response_b}`` (prompt a string, a raw
    HH transcript or a message list ending on a user turn) or any preference record that
    :mod:`alignforge.data.readers` accepts (``chosen`` becomes ``response_a``). Optional:
    ``id``, ``category``, ``gold`` (``"a"``, ``"b"``, ``"tie"``, ``"a2"``, ``"b2"`` or -2..2)."""
    from alignforge.data import readers as R

    ctx = R._Ctx(fname, line)
    if not isinstance(obj, dict):
        raise DataError(f"not a JSON object: got {R._tname(obj)}", file=fname, line=line)
    if "response_a" in obj or "response_b" in obj:
        prompt, _ = R._prompt_value(R._require(obj, "prompt", ctx), ctx)
        resp = []
        for f in ("response_a", "response_b"):
            v = R._require(obj, f, ctx)
            if not isinstance(v, str):
                raise ctx.err(f, f"wrong type: expected a string, got {R._tname(v)}")
            if not v.strip():
                raise ctx.err(f, "empty response")
            resp.append(v)
        a, b = resp
        category = R._category(obj, ctx)
    else:
        rec = R.parse_preference(obj, ctx)
        prompt, category = rec.prompt, rec.category
        if len(rec.chosen) != 1 or len(rec.rejected) != 1:
            raise ctx.err("chosen", "a response must be a single assistant message")
        a, b = rec.chosen[0]["content"], rec.rejected[0]["content"]
    if a == b:
        raise ctx.err("response_b", "identical responses: nothing to compare")
    gold = obj.get("gold")
    gold_overall = None
    if gold is not None:
        if isinstance(gold, bool) or not (isinstance(gold, (str, int))):
            raise ctx.err("gold", f"wrong type: expected a string or an integer, got {R._tname(gold)}")
        if isinstance(gold, int):
            if not -2 <= gold <= 2:
                raise ctx.err("gold", f"out of range [-2, 2]: {gold}")
            gold_overall = gold
        elif gold in GOLD_VALUES:
            gold_overall = GOLD_VALUES[gold]
        else:
            raise ctx.err("gold", f"unknown value {gold!r} (expected one of {', '.join(GOLD_VALUES)})")
    uid = obj.get("id")
    if uid is not None:
        if not isinstance(uid, (str, int)) or isinstance(uid, bool):
            raise ctx.err("id", f"wrong type: expected a string or an integer, got {R._tname(uid)}")
        uid = str(uid)
        if not uid or len(uid) > 128:
            raise ctx.err("id", "must be 1-128 characters")
    return PairRecord(uid or _content_uid(prompt, a, b), prompt, a, b, category, gold_overall, f"{fname}:{line}", line)


def read_pairs(
    path: str | Path, skip_invalid: bool = False, dropped: list[DataError] | None = None
) -> list[PairRecord]:
    """Validate a whole import file; raises :class:`ImportFileError` listing every bad line,
    or with ``skip_invalid`` leaves bad lines out (appending their errors to ``dropped``)."""
    p = Path(path)
    fname = str(path)
    if not p.is_file():
        raise DataError("file not found", file=fname)
    out: list[PairRecord] = []
    errors: list[DataError] = []
    seen: dict[str, int] = {}
    from alignforge.data.readers import iter_entries

    for line, obj in iter_entries(p):  # JSONL / JSON / gzip; unparsable entries come as DataError
        if isinstance(obj, DataError):
            errors.append(obj)
            continue
        try:
            rec = parse_pair(obj, fname, line)
        except DataError as e:
            errors.append(e)
            continue
        if rec.uid in seen:
            errors.append(
                DataError(
                    f"duplicate id {rec.uid!r} (first on line {seen[rec.uid]})", file=fname, line=line, field="id"
                )
            )
            continue
        seen[rec.uid] = line
        out.append(rec)
    if errors and not skip_invalid:
        raise ImportFileError(errors)
    if dropped is not None:
        dropped.extend(errors)
    return out


class ImportFileError(DataError):
    """Several bad lines; ``str()`` lists each as ``FILE:LINE: field 'F': reason``."""

    def __init__(self, errors: list[DataError]):
        self.errors = errors
        first = errors[0]
        super().__init__(first.reason, first.file, first.line, first.field)

    def format(self) -> str:  # type: ignore[override]
        errs = getattr(self, "errors", None)
        if not errs:
            return super().format()
        shown = [e.format() for e in errs[:20]]
        more = f"\n... and {len(errs) - 20} more" if len(errs) > 20 else ""
        return f"{len(errs)} invalid record(s), nothing imported:\n" + "\n".join(shown) + more


@dataclass
class ImportReport:
    path: str
    read: int
    added: int
    skipped_existing: int
    gold: int
    invalid: list[DataError] = field(default_factory=list)
    # lines whose id is already stored with different content (the stored content is kept)
    conflicts: list[DataError] = field(default_factory=list)

    def summary(self) -> str:
        s = (
            f"imported {self.path}: {self.read} pairs read, {self.added} added "
            f"({self.gold} gold), {self.skipped_existing} already present"
        )
        if self.conflicts:
            s += (
                f"; {len(self.conflicts)} of them with different content (stored content kept, "
                "give changed pairs a new id):\n" + "\n".join(e.format() for e in self.conflicts[:20])
            )
            if len(self.conflicts) > 20:
                s += f"\n... and {len(self.conflicts) - 20} more"
        if self.invalid:
            s += f"; {len(self.invalid)} invalid records skipped:\n" + "\n".join(e.format() for e in self.invalid[:20])
        return s


def import_pairs(S: sessionmaker[Session], path: str | Path, skip_invalid: bool = False) -> ImportReport:
    """Import a pair file: all or nothing, or leaving invalid records out with
    ``skip_invalid``. Items already present (same ``id``, or the same content when there is
    no id) are skipped, so re-importing a file is harmless; a line whose ``id`` is stored
    with different content (prompt, responses, category or gold) keeps the stored item and is
    listed in ``conflicts`` (file, line, and what differs)."""
    invalid: list[DataError] = []
    conflicts: list[DataError] = []
    recs = read_pairs(path, skip_invalid, invalid)
    added = gold = 0
    with S.begin() as s:
        existing = {it.uid: it for it in s.scalars(select(Item))}
        for r in recs:
            old = existing.get(r.uid)
            if old is not None:
                diff = [
                    name
                    for name, new, was in (
                        ("prompt", json.dumps(r.prompt, ensure_ascii=False), old.prompt_json),
                        ("response_a", r.response_a, old.response_a),
                        ("response_b", r.response_b, old.response_b),
                        ("category", r.category, old.category),
                        ("gold", r.gold_overall, old.gold_overall),
                    )
                    if new != was
                ]
                if diff:
                    conflicts.append(
                        DataError(
                            f"id {r.uid!r} is already imported with a different {', '.join(diff)}; "
                            "kept the stored item",
                            file=str(path),
                            line=r.line,
                            field="id",
                        )
                    )
                continue
            it = Item(
                uid=r.uid,
                prompt_json=json.dumps(r.prompt, ensure_ascii=False),
                response_a=r.response_a,
                response_b=r.response_b,
                category=r.category,
                is_gold=r.gold_overall is not None,
                gold_overall=r.gold_overall,
                source=(r.source or "")[-512:],
            )
            s.add(it)
            existing[r.uid] = it
            added += 1
            gold += r.gold_overall is not None
    return ImportReport(str(path), len(recs), added, len(recs) - added, gold, invalid, conflicts)


# --------------------------------------------------------------------------- leases


def _lock_item(s: Session, item_id: int) -> Item | None:
    """Lock the item row until the transaction ends (SQLite: BEGIN IMMEDIATE already holds
    the database write lock; FOR UPDATE is not emitted there)."""
    return s.scalar(select(Item).where(Item.id == item_id).with_for_update())


def _places_taken(s: Session, item_id: int, now: dt.datetime, exclude_user: int | None = None) -> int:
    j = s.scalar(select(func.count()).select_from(Judgment).where(Judgment.item_id == item_id)) or 0
    q = (
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.item_id == item_id, Assignment.status == "active", Assignment.lease_expires_at > now)
    )
    if exclude_user is not None:
        q = q.where(Assignment.user_id != exclude_user)
    return j + (s.scalar(q) or 0)


def _lease_token() -> str:
    return secrets.token_urlsafe(24)


def claim_next(
    S: sessionmaker[Session], user_id: int, k: int, lease_seconds: float, now: dt.datetime | None = None
) -> Assignment | None:
    """The user's current unexpired lease, or a new lease on the first item with a free place
    (never an item the user judged or skipped); None when nothing is left for this user."""
    if k < 1:
        raise AlignforgeError(f"k must be >= 1, got {k}")
    with S.begin() as s:
        now = now or utcnow()
        cur = s.scalar(
            select(Assignment)
            .where(Assignment.user_id == user_id, Assignment.status == "active", Assignment.lease_expires_at > now)
            .order_by(Assignment.id)
            .limit(1)
        )
        if cur is not None:
            if cur.submission_token is None:  # a lease from before migration 0002
                cur.submission_token = _lease_token()
            return cur
        jcount = (
            select(func.count())
            .select_from(Judgment)
            .where(Judgment.item_id == Item.id)
            .correlate(Item)
            .scalar_subquery()
        )
        lcount = (
            select(func.count())
            .select_from(Assignment)
            .where(Assignment.item_id == Item.id, Assignment.status == "active", Assignment.lease_expires_at > now)
            .correlate(Item)
            .scalar_subquery()
        )
        finished = select(Assignment.item_id).where(
            Assignment.user_id == user_id, Assignment.status.in_(("done", "skipped"))
        )
        # Scan forward in id order. Under PostgreSQL's READ COMMITTED the candidate query reads
        # a snapshot, so concurrent claimers may fill a whole batch before we lock it: then
        # the next batch is read (a fresh snapshot), until no candidate is left.
        after = 0
        while True:
            cands = list(
                s.scalars(
                    select(Item.id)
                    .where(Item.id > after, Item.id.not_in(finished), or_(Item.is_gold, jcount + lcount < k))
                    .order_by(Item.id)
                    .limit(16)
                )
            )
            if not cands:
                return None
            for item_id in cands:
                after = item_id
                item = _lock_item(s, item_id)
                if item is None:
                    continue
                mine = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.user_id == user_id))
                if mine is not None and mine.status != "active":
                    continue
                if not item.is_gold and _places_taken(s, item_id, now, exclude_user=user_id) >= k:
                    continue
                expires = now + dt.timedelta(seconds=lease_seconds)
                if mine is not None:  # the user's own expired lease: renew it (same token)
                    mine.leased_at, mine.lease_expires_at = now, expires
                    mine.submission_token = mine.submission_token or _lease_token()
                    return mine
                a = Assignment(
                    item_id=item_id,
                    user_id=user_id,
                    swapped=bool(secrets.randbelow(2)),
                    status="active",
                    leased_at=now,
                    lease_expires_at=expires,
                    submission_token=_lease_token(),
                )
                s.add(a)
                s.flush()
                return a


NOT_YOURS = "this item is not assigned to you"


def skip(S: sessionmaker[Session], user_id: int, assignment_id: int) -> "SubmitResult":
    """Give the item back (the user will not see it again). Status ``"ok"``, or
    ``"rejected"`` with the reason: not the user's assignment, or already judged/skipped."""
    if not valid_id(assignment_id):
        return SubmitResult("rejected", NOT_YOURS)
    with S.begin() as s:
        a = s.get(Assignment, assignment_id)
        if a is None or a.user_id != user_id:
            return SubmitResult("rejected", NOT_YOURS)
        if a.status == "skipped":
            return SubmitResult("rejected", "you already skipped this item")
        if a.status != "active":
            return SubmitResult("rejected", "you already judged this item; it cannot be skipped")
        a.status = "skipped"
        return SubmitResult("ok", "skipped")


@dataclass
class SubmitResult:
    status: str  # "ok", "duplicate" (same token seen before: nothing new recorded), "rejected"
    message: str = ""
    judgment_id: int | None = None
    late: bool = False

    @property
    def accepted(self) -> bool:
        return self.status in ("ok", "duplicate")


@dataclass
class JudgmentForm:
    overall: str
    prompt_quality: str
    helpfulness: str = ""
    harmlessness: str = ""
    fluency: str = ""
    comment: str = ""

    def validate(self) -> str | None:
        if self.overall not in OVERALL_CHOICES:
            return "choose an overall judgment (keys 1-6)"
        if self.prompt_quality not in PROMPT_QUALITY:
            return "choose a prompt-quality label"
        for c in CRITERIA:
            if getattr(self, c) not in CRITERION_CHOICES:
                return f"invalid value for {c}"
        if len(self.comment) > MAX_COMMENT:
            return f"comment too long (at most {MAX_COMMENT} characters)"
        return None


def _canon(v: int | None, swapped: bool) -> int | None:
    return None if v is None else (-v if swapped else v)


def submit(
    S: sessionmaker[Session],
    user_id: int,
    assignment_id: int,
    token: str,
    form: JudgmentForm,
    k: int,
    now: dt.datetime | None = None,
) -> SubmitResult:
    """Record one judgment (idempotent on ``token``, which must be the one issued with the
    lease ``assignment_id``); see the module docstring."""
    if not token or len(token) > 64 or not all(c.isalnum() or c in "-_" for c in token):
        return SubmitResult("rejected", "invalid submission token")
    bad = form.validate()
    if bad:
        return SubmitResult("rejected", bad)
    if not valid_id(assignment_id):
        return SubmitResult("rejected", NOT_YOURS)
    try:
        with S.begin() as s:
            now = now or utcnow()
            a = s.get(Assignment, assignment_id)
            if a is None or a.user_id != user_id:
                return SubmitResult("rejected", NOT_YOURS)
            if a.submission_token is None or not secrets.compare_digest(a.submission_token, token):
                return SubmitResult(
                    "rejected", "invalid submission token: it was not issued for this item; reload the page"
                )
            item = _lock_item(s, a.item_id)
            prev = s.scalar(select(Judgment).where(Judgment.submission_token == token))
            if prev is not None:
                if prev.user_id != user_id or prev.assignment_id != assignment_id:
                    return SubmitResult("rejected", "invalid submission token")
                return SubmitResult("duplicate", "already recorded", prev.id, prev.late)
            s.refresh(a)
            if (
                a.status == "done"
                or s.scalar(select(Judgment.id).where(Judgment.item_id == a.item_id, Judgment.user_id == user_id))
                is not None
            ):
                return SubmitResult("rejected", "you already judged this item; the first judgment counts")
            if a.status == "skipped":
                return SubmitResult("rejected", "you skipped this item; the judgment was not recorded")
            late = a.lease_expires_at <= now
            if (
                late
                and item is not None
                and not item.is_gold
                and _places_taken(s, a.item_id, now, exclude_user=user_id) >= k
            ):
                return SubmitResult(
                    "rejected",
                    "your lease on this item expired and the item was given to another "
                    "annotator; this judgment was not recorded",
                )
            shown = OVERALL_CHOICES[form.overall]
            j = Judgment(
                submission_token=token,
                item_id=a.item_id,
                user_id=user_id,
                assignment_id=a.id,
                overall=_canon(shown, a.swapped),
                both_bad=form.overall == "both_bad",
                shown_overall=form.overall,
                prompt_quality=form.prompt_quality,
                comment=form.comment.strip() or None,
                swapped=a.swapped,
                late=late,
                created_at=now,
                **{c: _canon(CRITERION_CHOICES[getattr(form, c)], a.swapped) for c in CRITERIA},
            )
            s.add(j)
            a.status = "done"
            s.flush()
            return SubmitResult("ok", "recorded", j.id, late)
    except IntegrityError:
        # a concurrent submission with the same token (or for the same item) won the race
        with S() as s:
            prev = s.scalar(select(Judgment).where(Judgment.submission_token == token))
        if prev is not None and prev.user_id == user_id:
            return SubmitResult("duplicate", "already recorded", prev.id, prev.late)
        return SubmitResult("rejected", "you already judged this item; the first judgment counts")


# --------------------------------------------------------------------------- progress


@dataclass
class UserProgress:
    username: str
    role: str
    active: bool
    judged: int
    skipped: int
    late: int
    gold_judged: int
    gold_correct: int

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_judged if self.gold_judged else None


def _sign(x: int | None) -> int | None:
    return None if x is None else (x > 0) - (x < 0)


def user_progress(S: sessionmaker[Session], user_id: int, k: int) -> dict:
    """What the annotator sees: judged count and how many items are still open to them."""
    now = utcnow()
    with S() as s:
        judged = s.scalar(select(func.count()).select_from(Judgment).where(Judgment.user_id == user_id)) or 0
        finished = select(Assignment.item_id).where(
            Assignment.user_id == user_id, Assignment.status.in_(("done", "skipped"))
        )
        jcount = (
            select(func.count())
            .select_from(Judgment)
            .where(Judgment.item_id == Item.id)
            .correlate(Item)
            .scalar_subquery()
        )
        lcount = (
            select(func.count())
            .select_from(Assignment)
            .where(
                Assignment.item_id == Item.id,
                Assignment.status == "active",
                Assignment.lease_expires_at > now,
                Assignment.user_id != user_id,
            )
            .correlate(Item)
            .scalar_subquery()
        )
        open_ = (
            s.scalar(
                select(func.count())
                .select_from(Item)
                .where(Item.id.not_in(finished), or_(Item.is_gold, jcount + lcount < k))
            )
            or 0
        )
    return {"judged": judged, "open": open_}


def all_progress(S: sessionmaker[Session], k: int) -> dict:
    with S() as s:
        users = list(s.scalars(select(User).order_by(User.id)))
        rows = []
        for u in users:
            js = list(
                s.execute(
                    select(Judgment.overall, Judgment.both_bad, Judgment.late, Item.is_gold, Item.gold_overall)
                    .join(Item, Item.id == Judgment.item_id)
                    .where(Judgment.user_id == u.id)
                )
            )
            skipped = (
                s.scalar(
                    select(func.count())
                    .select_from(Assignment)
                    .where(Assignment.user_id == u.id, Assignment.status == "skipped")
                )
                or 0
            )
            gold = [r for r in js if r.is_gold]
            correct = sum(1 for r in gold if not r.both_bad and _sign(r.overall) == _sign(r.gold_overall))
            rows.append(
                UserProgress(
                    u.username, u.role, u.active, len(js), skipped, sum(1 for r in js if r.late), len(gold), correct
                )
            )
        n_items = s.scalar(select(func.count()).select_from(Item).where(Item.is_gold.is_(False))) or 0
        n_gold = s.scalar(select(func.count()).select_from(Item).where(Item.is_gold.is_(True))) or 0
        per_item = dict(s.execute(select(Judgment.item_id, func.count()).group_by(Judgment.item_id)).all())
        gold_ids = set(s.scalars(select(Item.id).where(Item.is_gold.is_(True))))
        complete = sum(1 for i, n in per_item.items() if i not in gold_ids and n >= k)
        n_judgments = sum(per_item.values())
        n_gold_judgments = sum(n for i, n in per_item.items() if i in gold_ids)
        active = (
            s.scalar(
                select(func.count())
                .select_from(Assignment)
                .where(Assignment.status == "active", Assignment.lease_expires_at > utcnow())
            )
            or 0
        )
    # ``target_judgments`` (items x k) counts non-gold items only, so it is compared with
    # ``item_judgments``; gold items go to everyone and are counted apart
    return {
        "users": rows,
        "items": n_items,
        "gold_items": n_gold,
        "complete_items": complete,
        "judgments": n_judgments,
        "item_judgments": n_judgments - n_gold_judgments,
        "gold_judgments": n_gold_judgments,
        "active_leases": active,
        "k": k,
        "target_judgments": n_items * k,
    }


def judged_rows(S: sessionmaker[Session]) -> list[dict]:
    """Every judgment joined with its item and annotator (admin/export use only)."""
    with S() as s:
        q = (
            select(Judgment, Item, User.username)
            .join(Item, Item.id == Judgment.item_id)
            .join(User, User.id == Judgment.user_id)
            .order_by(Judgment.id)
        )
        out = []
        for j, it, name in s.execute(q):
            out.append({"judgment": j, "item": it, "annotator": name})
        return out


@dataclass
class ItemView:
    assignment_id: int
    item_uid: str
    history: list[dict]
    left: str
    right: str
    lease_expires_at: dt.datetime
    submission_token: str = ""
    extra: dict = field(default_factory=dict)


def item_view(S: sessionmaker[Session], a: Assignment) -> ItemView:
    with S() as s:
        it = s.get(Item, a.item_id)
        prompt = json.loads(it.prompt_json)
        left, right = (it.response_b, it.response_a) if a.swapped else (it.response_a, it.response_b)
        return ItemView(a.id, it.uid, prompt, left, right, a.lease_expires_at, a.submission_token or "")
