"""Fixtures of the annotation tests: databases (SQLite, a throwaway PostgreSQL), a server
in a subprocess, and an HTTP annotator client."""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("ALIGNFORGE_TEST_ARTIFACTS", REPO / "outputs" / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fast_hasher():
    from alignforge.annotate.service import password_hasher

    return password_hasher(fast=True)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bindir() -> str | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(f"{d}/initdb") and os.path.exists(f"{d}/pg_ctl"):
            return d
    return None


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL cluster on a free loopback port, stopped at session end."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin); "
            "install Debian's 'postgresql' package (.ci/run does)"
        )
    base = Path(tempfile.mkdtemp(prefix="af-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb/postgres refuse to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = pwd.getpwnam("nobody")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", pw.pw_name, "--"]
    data, port = base / "data", free_port()
    env = {**os.environ, "LC_ALL": "C"}
    r = subprocess.run(
        prefix + [f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "af", "-E", "UTF8", "--no-sync"],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"initdb failed: {r.stderr[-2000:]}")
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -F -c max_connections=200"
    r = subprocess.run(
        prefix + [f"{bindir}/pg_ctl", "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "-o", opts, "start"],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        log = (base / "log").read_text() if (base / "log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {r.stderr[-1000:]} {log[-2000:]}")
    try:
        yield f"postgresql+psycopg://af@127.0.0.1:{port}"
    finally:
        subprocess.run(
            prefix + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            env=env,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh database on the session's PostgreSQL server."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    dsn = pg_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn + "/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"{pg_server}/{name}"


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'annotate.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'annotate.db'}"
    return request.getfixturevalue("pg_url")


# --------------------------------------------------------------------------- data


def write_pairs(path: Path, n: int, start: int = 0, **extra) -> Path:
    with open(path, "w") as f:
        for i in range(start, start + n):
            rec = {
                "id": f"item-{i}",
                "prompt": [{"role": "user", "content": f"Question {i}?"}],
                "response_a": f"short answer {i}",
                "response_b": f"a much longer answer number {i}",
            }
            rec.update(extra)
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture
def db(sqlite_url):
    from alignforge.annotate.db import open_db

    engine, S = open_db(sqlite_url)
    yield S
    engine.dispose()


# --------------------------------------------------------------------------- server


class Server:
    """``python -m alignforge.annotate serve`` in a subprocess on a loopback port."""

    def __init__(self, db_url: str, k: int = 3, lease_minutes: float = 15.0, port: int | None = None):
        self.db_url, self.k, self.lease_minutes = db_url, k, lease_minutes
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "Server":
        import httpx

        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alignforge.annotate",
                "serve",
                "--db",
                self.db_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--k",
                str(self.k),
                "--lease-minutes",
                str(self.lease_minutes),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start in time")

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def server_factory():
    servers: list[Server] = []

    def make(db_url: str, **kw) -> Server:
        s = Server(db_url, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


FIELD_RE = re.compile(r'name="(csrf_token|assignment_id|submission_token)" value="([^"]*)"')


class Annotator:
    """An HTTP client that logs in and judges items like the HTML form does."""

    def __init__(self, base_url: str, username: str, password: str, retry_s: float = 0.0):
        import httpx

        self.c = httpx.Client(base_url=base_url, timeout=60, follow_redirects=False)
        self.username, self.password = username, password
        self.retry_s = retry_s  # keep retrying (same request) on connection errors this long

    def _req(self, method: str, url: str, **kw):
        import httpx

        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return self.c.request(method, url, **kw)
            except httpx.TransportError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def login(self) -> None:
        r = self._req("GET", "/login")
        tok = FIELD_RE.search(r.text).group(2)
        r = self._req("POST", "/login", data={"username": self.username, "password": self.password, "csrf_token": tok})
        assert r.status_code == 303, (r.status_code, r.text[:500])

    def next_item(self) -> dict | None:
        r = self._req("GET", "/annotate")
        assert r.status_code == 200, (r.status_code, r.text[:300])
        if 'id="judge-form"' not in r.text:
            return None
        return dict(FIELD_RE.findall(r.text))

    def submit(self, fields: dict, overall: str = "a1", **extra):
        data = {**fields, "overall": overall, "prompt_quality": "clear", **extra}
        return self._req("POST", "/annotate/submit", data=data)

    def close(self) -> None:
        self.c.close()


@pytest.fixture(scope="session")
def pairs_writer():
    return write_pairs


@pytest.fixture(scope="session")
def annotator_cls():
    return Annotator
