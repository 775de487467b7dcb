"""Database schema, engine setup and migrations of the annotation app.

SQLite (the default) runs in WAL mode with ``synchronous=FULL``, so a commit that was
acknowledged survives a ``kill -9`` of the server (and a power loss); every transaction
starts with ``BEGIN IMMEDIATE`` so that claims and submissions are serialised. PostgreSQL
is used through a ``postgresql+psycopg://`` URL; there, claims and submissions lock the
item row with ``SELECT ... FOR UPDATE``.

Judgments are append-only: the ORM refuses to flush an UPDATE or DELETE of a
:class:`Judgment` (see :func:`_forbid_judgment_changes`). The schema is created and
upgraded by Alembic (:func:`upgrade`), never by ``create_all``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from alignforge.errors import AlignforgeError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
DEFAULT_URL = "sqlite:///annotate.db"

ROLES = ("admin", "annotator")
PROMPT_QUALITY = ("clear", "unclear_intent", "unclear_semantics", "unanswerable")


def utcnow() -> dt.datetime:
    """Naive UTC now (stored naive on both backends)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class AuthSession(Base):
    """A login session; the cookie holds a random token, the table only its SHA-256."""

    __tablename__ = "sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Item(Base):
    """One pair to judge: a prompt (JSON message list) and two responses."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(128), unique=True)
    prompt_json: Mapped[str] = mapped_column(Text)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(128), nullable=True)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    # gold answer on the overall scale in the item's own A/B orientation (-2..2), or None
    gold_overall: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Assignment(Base):
    """An item leased to an annotator. ``status``: active, done or skipped.

    ``swapped`` is the display order: when true, the left column ("A" on screen) shows
    ``response_b``. ``submission_token`` is issued with the lease (kept when the lease is
    renewed); a judgment is accepted only with this token, so a token is bound to its lease.
    """

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "user_id", name="uq_assignment_item_user"),
        Index("ix_assignments_item_status", "item_id", "status"),
        Index("ix_assignments_submission_token", "submission_token", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    swapped: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16), default="active")
    leased_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    # None only for leases issued before migration 0002 (one is issued on the next claim)
    submission_token: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Judgment(Base):
    """One annotator's judgment of one item (append-only).

    ``overall`` is in the item's own orientation: +2 ``response_a`` much better ... -2
    ``response_b`` much better, 0 tie, None when ``both_bad``. The criteria are +1 (a
    better), 0 (same), -1 (b better) or None (not rated). ``shown_overall`` is the raw
    choice as displayed (before undoing ``swapped``).
    """

    __tablename__ = "judgments"
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_judgment_item_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_token: Mapped[str] = mapped_column(String(64), unique=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"))
    overall: Mapped[int | None] = mapped_column(Integer, nullable=True)
    both_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    shown_overall: Mapped[str] = mapped_column(String(16))
    helpfulness: Mapped[int | None] = mapped_column(Integer, nullable=True)
    harmlessness: Mapped[int | None] = mapped_column(Integer, nullable=True)
    fluency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt_quality: Mapped[str] = mapped_column(String(32))
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    swapped: Mapped[bool] = mapped_column(Boolean)
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class LoginAttempt(Base):
    """One login attempt under a rate-limit bucket (see :func:`service.begin_login_attempt`).

    Failed attempts stay until they leave the window; an attempt that succeeds or is
    refused is deleted. ``key_hash`` is the SHA-256 of the bucket name (``"user:<ip>:<name>"``
    or ``"ip:<ip>"``). Kept in the database so that the limit holds across worker processes
    and servers."""

    __tablename__ = "login_attempts"
    __table_args__ = (Index("ix_login_attempts_key_at", "key_hash", "at"), Index("ix_login_attempts_at", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(DateTime)


class AppendOnlyError(AlignforgeError):
    """Raised when code tries to update or delete a judgment."""


def _forbid_judgment_changes(session: Session, flush_context: Any, instances: Any) -> None:
    for obj in list(session.dirty):
        if isinstance(obj, Judgment) and session.is_modified(obj, include_collections=False):
            raise AppendOnlyError(f"judgments are append-only: refusing to UPDATE judgment {obj.id}")
    for obj in list(session.deleted):
        if isinstance(obj, Judgment):
            raise AppendOnlyError(f"judgments are append-only: refusing to DELETE judgment {obj.id}")


event.listen(Session, "before_flush", _forbid_judgment_changes)


@event.listens_for(Session, "do_orm_execute")
def _forbid_bulk_judgment_changes(state: Any) -> None:
    if (state.is_update or state.is_delete) and state.bind_mapper is not None and state.bind_mapper.class_ is Judgment:
        raise AppendOnlyError("judgments are append-only: refusing a bulk UPDATE/DELETE")


# --------------------------------------------------------------------------- engines


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs (use psycopg 3) and bare SQLite paths."""
    if "://" not in url:
        return f"sqlite:///{url}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(engine_or_url: Any) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(str(engine_or_url))
    return url.get_backend_name() == "sqlite"


def make_engine(url: str, **kw: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, synchronous=FULL and ``BEGIN IMMEDIATE``."""
    url = normalize_url(url)
    if is_sqlite(url):
        u = make_url(url)
        if u.database in (None, "", ":memory:"):
            raise AlignforgeError("an in-memory SQLite database cannot be shared; give a file path")
        Path(u.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=8,
            max_overflow=32,
            pool_timeout=120,
            **kw,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=8, max_overflow=32, pool_pre_ping=True, **kw)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


# --------------------------------------------------------------------------- migrations


def alembic_config(engine: Engine | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (idempotent)."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def open_db(url: str, migrate: bool = True) -> tuple[Engine, sessionmaker[Session]]:
    """Engine + session factory for ``url``; runs migrations to head when ``migrate``."""
    engine = make_engine(url)
    if migrate:
        upgrade(engine)
    return engine, session_factory(engine)
