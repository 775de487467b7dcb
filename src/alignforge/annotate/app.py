"""The annotation web app (FastAPI, server-rendered Jinja2 pages, one small static JS file).

Security model:

* Passwords are Argon2id hashes; login sessions are random tokens in an ``HttpOnly``,
  ``SameSite=Strict`` cookie (``Secure`` with ``secure_cookies``), stored hashed.
* Every POST form carries a CSRF token: the session's token once logged in, a double-submit
  cookie on the login form.
* Every route except ``/login``, ``/healthz`` and ``/static`` goes through :func:`_auth`
  with an explicit role list; admin pages and exports are admin-only, and no annotator
  route shows anything but the annotator's own item and counts.
* Untrusted text is rendered by :mod:`alignforge.annotate.render`; every response carries a
  strict CSP (no inline scripts, no images) and ``nosniff``/``DENY`` headers.
* Failed logins are rate-limited in the database (so the limit holds across ``uvicorn
  --workers`` and several servers on one database), in two buckets: per (normalised user
  name, client address), ``login_max_failures`` per window, and per client address,
  ``login_ip_max_failures`` per window. Failures from one address never lock an account
  for other addresses, so a stranger cannot lock someone out (only clients sharing the
  stranger's address, e.g. behind one NAT, share a bucket). Behind a reverse proxy, let
  uvicorn take the client address from ``X-Forwarded-For`` (trusted from
  ``$FORWARDED_ALLOW_IPS``, loopback by default); otherwise every client has the proxy's.
"""

from __future__ import annotations

import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from alignforge.annotate import service as svc
from alignforge.annotate.db import PROMPT_QUALITY, ROLES, open_db, utcnow
from alignforge.annotate.render import render_markdown
from alignforge.errors import AlignforgeError

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "af_session"
LOGIN_CSRF_COOKIE = "af_login_csrf"
CSP = (
    "default-src 'self'; img-src 'none'; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
PUBLIC_PATHS = ("/login", "/healthz", "/static")
MESSAGES = {
    "ok": "Judgment recorded.",
    "late": "Judgment recorded (your lease had expired).",
    "dup": "That judgment was already recorded.",
    "skip": "Item skipped.",
    "created": "User saved.",
    "updated": "User updated.",
}
EXPORTS = ("trl", "ties", "raw", "pointwise")
ACTIVE_VALUES: dict[str, bool | None] = {"": None, "1": True, "0": False}  # the users form's choices


@dataclass
class AppConfig:
    db_url: str
    k: int = 3
    lease_seconds: float = 900.0
    secure_cookies: bool = False
    login_max_failures: int = 5  # per (normalised user name, client address), per window
    login_ip_max_failures: int = 50  # per client address, per window
    login_window_s: float = 300.0
    migrate: bool = True


class AuthRedirect(Exception):
    pass


class Forbidden(Exception):
    pass


class CSRFError(Exception):
    pass


@dataclass
class Ctx:
    user: Any
    csrf: str
    token: str


def create_app(cfg: AppConfig) -> FastAPI:
    engine, S = open_db(cfg.db_url, migrate=cfg.migrate)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["md"] = render_markdown
    templates.env.globals.update(
        OVERALL_LABELS=svc.OVERALL_LABELS,
        PROMPT_QUALITY=PROMPT_QUALITY,
        PROMPT_QUALITY_LABELS=svc.PROMPT_QUALITY_LABELS,
        CRITERIA=svc.CRITERIA,
        ROLES=ROLES,
    )

    app = FastAPI(title="alignforge annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cfg, app.state.engine, app.state.S = cfg, engine, S
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable) -> Response:
        resp = await call_next(request)
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.exception_handler(AuthRedirect)
    async def _to_login(request: Request, exc: AuthRedirect) -> Response:
        if request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("not logged in", status_code=401)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return PlainTextResponse("forbidden: your role does not allow this page", status_code=403)

    @app.exception_handler(CSRFError)
    async def _csrf(request: Request, exc: CSRFError) -> Response:
        return PlainTextResponse("invalid or missing CSRF token; reload the page and try again", status_code=403)

    def page(request: Request, name: str, ctx: Ctx | None, status: int = 200, **kw: Any) -> Response:
        return templates.TemplateResponse(
            request, name, {"me": ctx.user if ctx else None, "csrf": ctx.csrf if ctx else "", **kw}, status_code=status
        )

    def bad_id(request: Request, ctx: Ctx) -> Response:
        return page(
            request,
            "message.html",
            ctx,
            status=422,
            title="Not recorded",
            message=f"invalid assignment id (expected 1 to {svc.MAX_ID}); reload the page",
        )

    def _auth(*roles: str, csrf: bool = False) -> Callable:
        async def dep(request: Request) -> Ctx:
            token = request.cookies.get(SESSION_COOKIE)
            found = await run_in_threadpool(svc.get_session, S, token)
            if found is None:
                raise AuthRedirect()
            user, sess = found
            if user.role not in roles:
                raise Forbidden()
            if csrf:
                form = await request.form()
                sent = form.get("csrf_token")
                if not isinstance(sent, str) or not secrets.compare_digest(sent, sess.csrf_token):
                    raise CSRFError()
            return Ctx(user, sess.csrf_token, token or "")

        return dep

    anyone = _auth(*ROLES)
    anyone_post = _auth(*ROLES, csrf=True)
    admin = _auth("admin")
    admin_post = _auth("admin", csrf=True)

    # ------------------------------------------------------------------ public
    @app.get("/healthz")
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/login")
    def login_form(request: Request) -> Response:
        tok = secrets.token_urlsafe(24)
        resp = page(request, "login.html", None, login_csrf=tok, error=None)
        resp.set_cookie(
            LOGIN_CSRF_COOKIE, tok, httponly=True, samesite="strict", secure=cfg.secure_cookies, path="/login"
        )
        return resp

    @app.post("/login")
    def login(
        request: Request, username: str = Form(""), password: str = Form(""), csrf_token: str = Form("")
    ) -> Response:
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not secrets.compare_digest(cookie, csrf_token):
            raise CSRFError()
        ip = request.client.host if request.client else "?"
        ukey, ikey = svc.login_buckets(username[:64], ip[:128])
        wait, attempt = svc.begin_login_attempt(
            S, [(ukey, cfg.login_max_failures), (ikey, cfg.login_ip_max_failures)], cfg.login_window_s
        )
        if wait > 0:
            resp = page(
                request,
                "login.html",
                None,
                status=429,
                login_csrf=cookie,
                error=f"Too many failed login attempts. Try again in {int(wait) + 1} s.",
            )
            resp.headers["Retry-After"] = str(int(wait) + 1)
            return resp
        user = svc.authenticate(S, username[:64], password[:1024])
        svc.end_login_attempt(S, attempt, ok=user is not None, reset=(ukey,))
        if user is None:
            return page(
                request, "login.html", None, status=401, login_csrf=cookie, error="Wrong user name or password."
            )
        token = svc.create_session(S, user)
        resp = RedirectResponse("/admin" if user.role == "admin" else "/annotate", status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=cfg.secure_cookies,
            path="/",
            max_age=svc.SESSION_HOURS * 3600,
        )
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    # ------------------------------------------------------------------ any role
    @app.post("/logout")
    def logout(ctx: Ctx = Depends(anyone_post)) -> Response:
        svc.delete_session(S, ctx.token)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/")
    def home(ctx: Ctx = Depends(anyone)) -> Response:
        return RedirectResponse("/admin" if ctx.user.role == "admin" else "/annotate", status_code=303)

    @app.get("/annotate")
    def annotate_page(request: Request, m: str = "", ctx: Ctx = Depends(anyone)) -> Response:
        a = svc.claim_next(S, ctx.user.id, cfg.k, cfg.lease_seconds)
        prog = svc.user_progress(S, ctx.user.id, cfg.k)
        msg = MESSAGES.get(m)
        if a is None:
            return page(request, "done.html", ctx, progress=prog, message=msg)
        view = svc.item_view(S, a)
        return page(
            request,
            "annotate.html",
            ctx,
            item=view,
            progress=prog,
            message=msg,
            submission_token=view.submission_token,
            lease_minutes=max(1, round((view.lease_expires_at - utcnow()).total_seconds() / 60)),
        )

    @app.post("/annotate/submit")
    def annotate_submit(
        request: Request,
        assignment_id: int = Form(...),
        submission_token: str = Form(...),
        overall: str = Form(""),
        prompt_quality: str = Form(""),
        helpfulness: str = Form(""),
        harmlessness: str = Form(""),
        fluency: str = Form(""),
        comment: str = Form(""),
        ctx: Ctx = Depends(anyone_post),
    ) -> Response:
        if not svc.valid_id(assignment_id):
            return bad_id(request, ctx)
        form = svc.JudgmentForm(overall, prompt_quality, helpfulness, harmlessness, fluency, comment)
        res = svc.submit(S, ctx.user.id, assignment_id, submission_token, form, cfg.k)
        if res.accepted:
            code = "dup" if res.status == "duplicate" else "late" if res.late else "ok"
            return RedirectResponse(f"/annotate?m={code}", status_code=303)
        status = 422 if form.validate() else 409
        return page(request, "message.html", ctx, status=status, title="Not recorded", message=res.message)

    @app.post("/annotate/skip")
    def annotate_skip(request: Request, assignment_id: int = Form(...), ctx: Ctx = Depends(anyone_post)) -> Response:
        if not svc.valid_id(assignment_id):
            return bad_id(request, ctx)
        res = svc.skip(S, ctx.user.id, assignment_id)
        if not res.accepted:
            return page(request, "message.html", ctx, status=409, title="Not skipped", message=res.message)
        return RedirectResponse("/annotate?m=skip", status_code=303)

    # ------------------------------------------------------------------ admin
    @app.get("/admin")
    def admin_home(request: Request, ctx: Ctx = Depends(admin)) -> Response:
        return page(request, "admin.html", ctx, prog=svc.all_progress(S, cfg.k), exports=EXPORTS)

    @app.get("/admin/users")
    def admin_users(request: Request, m: str = "", ctx: Ctx = Depends(admin)) -> Response:
        return page(request, "users.html", ctx, users=svc.list_users(S), message=MESSAGES.get(m), error=None)

    @app.post("/admin/users")
    def admin_create_user(
        request: Request,
        username: str = Form(...),
        password: str = Form(...),
        role: str = Form("annotator"),
        ctx: Ctx = Depends(admin_post),
    ) -> Response:
        try:
            svc.create_user(S, username, password, role)
        except AlignforgeError as e:
            return page(request, "users.html", ctx, status=400, users=svc.list_users(S), message=None, error=str(e))
        return RedirectResponse("/admin/users?m=created", status_code=303)

    @app.post("/admin/users/update")
    def admin_update_user(
        request: Request,
        username: str = Form(...),
        role: str = Form(""),
        active: str = Form(""),
        password: str = Form(""),
        ctx: Ctx = Depends(admin_post),
    ) -> Response:
        try:
            if active not in ACTIVE_VALUES:
                raise AlignforgeError(f"invalid value for active: {active[:20]!r} (expected 1, 0 or empty)")
            svc.set_user(S, username, role=role or None, active=ACTIVE_VALUES[active], password=password or None)
        except AlignforgeError as e:
            return page(request, "users.html", ctx, status=400, users=svc.list_users(S), message=None, error=str(e))
        return RedirectResponse("/admin/users?m=updated", status_code=303)

    @app.get("/admin/agreement")
    def admin_agreement(request: Request, ctx: Ctx = Depends(admin)) -> Response:
        from alignforge.annotate.agreement import agreement_report, longer_won_share
        from alignforge.annotate.export import aggregate

        rows = svc.judged_rows(S)
        rep = agreement_report(
            (r["item"].id, r["annotator"], r["judgment"].overall, r["judgment"].both_bad) for r in rows
        )
        lw = longer_won_share(
            (r["judgment"].overall, r["judgment"].both_bad, r["item"].response_a, r["item"].response_b) for r in rows
        )
        agg = aggregate(S, "majority")
        lw_major = longer_won_share(
            (
                {"a": 1, "b": -1}.get(x["outcome"], 0),
                x["outcome"] == "both_bad",
                x["item"].response_a,
                x["item"].response_b,
            )
            for x in agg
        )
        return page(request, "agreement.html", ctx, rep=rep, lw=lw, lw_major=lw_major)

    @app.get("/admin/export/{kind}.jsonl")
    def admin_export(kind: str, method: str = "majority", ctx: Ctx = Depends(admin)) -> Response:
        from alignforge.annotate import export as ex

        if kind not in EXPORTS or method not in ex.METHODS:
            return PlainTextResponse("unknown export", status_code=404)
        tmpdir = Path(tempfile.mkdtemp(prefix="af-export-"))
        out = tmpdir / f"{kind}.jsonl"
        if kind == "trl":
            ex.export_trl(S, out, method)
        elif kind == "ties":
            ex.export_trl(S, tmpdir / "pairs.jsonl", method, ties_path=out)
        elif kind == "raw":
            ex.export_raw(S, out)
        else:
            ex.export_pointwise(S, out, method)

        def cleanup() -> None:
            for p in tmpdir.iterdir():
                p.unlink()
            tmpdir.rmdir()

        return FileResponse(
            out, media_type="application/x-ndjson", filename=f"{kind}.jsonl", background=BackgroundTask(cleanup)
        )

    return app


def route_roles(app: FastAPI) -> dict[str, str]:
    """``{"METHOD path": "public" | "auth"}`` for every route (used by tests)."""
    out = {}
    for r in app.routes:
        methods = getattr(r, "methods", None) or {"GET"}
        for m in methods:
            if m == "HEAD":
                continue
            out[f"{m} {r.path}"] = "public" if r.path.startswith(PUBLIC_PATHS) else "auth"
    return out
