"""Alembic migrations: the schema they build matches the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import tomllib
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from alignforge.annotate import db as D

TABLES = {"users", "sessions", "items", "assignments", "judgments", "login_attempts"}


def test_upgrade_matches_models_and_downgrades(db_url):
    engine = D.make_engine(db_url)
    assert D.current_revision(engine) is None
    D.upgrade(engine)
    D.upgrade(engine)  # idempotent
    assert D.current_revision(engine) == "0002"
    assert TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), D.Base.metadata) == []
    D.downgrade(engine, "base")
    assert not TABLES & set(inspect(engine).get_table_names())
    engine.dispose()


def test_sqlite_pragmas(sqlite_url):
    engine, _ = D.open_db(sqlite_url)
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_migrations_are_package_data():
    """The migrations live inside the package and pyproject ships them."""
    files = {
        p.relative_to(D.MIGRATIONS_DIR.parent.parent).as_posix()
        for p in D.MIGRATIONS_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {
        "annotate/migrations/env.py",
        "annotate/migrations/script.py.mako",
        "annotate/migrations/versions/0001_initial.py",
        "annotate/migrations/versions/0002_lease_tokens_login_attempts.py",
    } <= files
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["alignforge"]
    root = D.MIGRATIONS_DIR.parent.parent
    shipped = {p.relative_to(root).as_posix() for g in globs for p in root.glob(g) if p.is_file()}
    assert files <= shipped
    for sub in ("templates", "static"):
        assert {p.relative_to(root).as_posix() for p in (root / "annotate" / sub).iterdir()} <= shipped


def test_0002_upgrades_a_live_0001_database(db_url):
    """A lease issued under 0001 has no submission token; after the upgrade it gets one on
    the next claim and can be judged with it. Downgrading to 0001 keeps the data."""
    import datetime as dt

    from sqlalchemy import text

    from alignforge.annotate import service as svc

    engine = D.make_engine(db_url)
    D.upgrade(engine, "0001")
    now = D.utcnow()
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO users (id, username, password_hash, role, active, created_at) "
                "VALUES (1, 'old', 'x', 'annotator', true, :t)"
            ),
            {"t": now},
        )
        c.execute(
            text(
                "INSERT INTO items (id, uid, prompt_json, response_a, response_b, is_gold, created_at) "
                "VALUES (1, 'i1', '[{\"role\": \"user\", \"content\": \"q\"}]', 'a', 'b', false, :t)"
            ),
            {"t": now},
        )
        c.execute(
            text(
                "INSERT INTO assignments (id, item_id, user_id, swapped, status, leased_at, "
                "lease_expires_at) VALUES (1, 1, 1, false, 'active', :t, :e)"
            ),
            {"t": now, "e": now + dt.timedelta(hours=1)},
        )
    D.upgrade(engine)
    assert D.current_revision(engine) == "0002"
    S = D.session_factory(engine)
    a = svc.claim_next(S, 1, k=1, lease_seconds=60)
    assert a.id == 1 and a.submission_token
    assert svc.claim_next(S, 1, k=1, lease_seconds=60).submission_token == a.submission_token
    assert svc.submit(S, 1, 1, a.submission_token, svc.JudgmentForm("a1", "clear"), k=1).status == "ok"
    D.downgrade(engine, "0001")
    assert "login_attempts" not in inspect(engine).get_table_names()
    assert "submission_token" not in {c["name"] for c in inspect(engine).get_columns("assignments")}
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM judgments")).scalar() == 1
    engine.dispose()
