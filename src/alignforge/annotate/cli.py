"""CLI of the annotation app: ``alignforge annotate ...`` and ``alignforge pairs generate``.

Register in the main CLI with::

    from alignforge.annotate.cli import annotate_app, pairs_app
    app.add_typer(annotate_app, name="annotate")
    app.add_typer(pairs_app, name="pairs")

Importing this module imports only typer; every command imports what it needs, so the
web stack (and, for ``pairs generate``, torch) is loaded only when used. Errors a user
can cause print ``error: ...`` on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable, Optional

import typer

from alignforge.errors import AlignforgeError

DB_ENV = "ALIGNFORGE_ANNOTATE_DB"
PASSWORD_ENV = "ALIGNFORGE_ANNOTATE_PASSWORD"
DEFAULT_DB = "sqlite:///annotate.db"

annotate_app = typer.Typer(
    help="Pairwise human-preference annotation: web app, import, export, agreement, users.", no_args_is_help=True
)
users_app = typer.Typer(help="Manage annotation users (roles: admin, annotator).", no_args_is_help=True)
annotate_app.add_typer(users_app, name="users")
pairs_app = typer.Typer(help="Response pairs for annotation.", no_args_is_help=True)


@pairs_app.callback()
def _pairs() -> None:
    """Response pairs for annotation."""  # keeps `generate` a subcommand when used alone


DbOpt = typer.Option(
    None,
    "--db",
    help=f"Database URL (sqlite:///path.db or postgresql://user@host/db); default ${DB_ENV} or {DEFAULT_DB}",
)


def _db(db: Optional[str]) -> str:
    return db or os.environ.get(DB_ENV) or DEFAULT_DB


def _friendly(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except AlignforgeError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def _open(db: Optional[str]):
    from alignforge.annotate.db import open_db

    return open_db(_db(db))


# --------------------------------------------------------------------------- annotate

SERVE_HELP = (
    "Run the web app (migrates the database to the latest schema first).\n\n"
    "Failed logins are rate-limited in the database, so the limit holds across worker processes and "
    "several servers on one database: 5 failures per (user name, client address) and 50 per client "
    "address in 5 minutes. Failures from one address never lock the account for other addresses. "
    "Behind a reverse proxy, the client address comes from X-Forwarded-For, trusted only from "
    "$FORWARDED_ALLOW_IPS (default: loopback)."
)


@annotate_app.command("serve", help=SERVE_HELP)
@_friendly
def serve(
    db: Optional[str] = DbOpt,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    k: int = typer.Option(3, "--k", min=1, help="Annotators per item."),
    lease_minutes: float = typer.Option(15.0, min=0.01, help="How long an annotator holds an item."),
    secure_cookies: bool = typer.Option(False, help="Mark cookies Secure (behind HTTPS)."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Run the web app; see ``SERVE_HELP``."""
    import uvicorn

    from alignforge.annotate.app import AppConfig, create_app

    app = create_app(AppConfig(_db(db), k=k, lease_seconds=lease_minutes * 60, secure_cookies=secure_cookies))
    typer.echo(f"serving on http://{host}:{port} (k={k}, db={_db(db)})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


@annotate_app.command("import")
@_friendly
def import_(
    path: Path = typer.Argument(
        ..., help="JSONL of pairs: {prompt, response_a, response_b[, id, gold, category]} or preference records."
    ),
    skip_invalid: bool = typer.Option(False, help="Leave invalid records out (listed) instead of importing nothing."),
    db: Optional[str] = DbOpt,
) -> None:
    """Import pairs to annotate (all or nothing by default; re-importing is harmless: an id stored
    with different content keeps the stored item and is listed, with its file and line)."""
    from alignforge.annotate.service import import_pairs

    _, S = _open(db)
    typer.echo(import_pairs(S, path, skip_invalid).summary())


@annotate_app.command("export")
@_friendly
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL (.gz to compress)."),
    fmt: str = typer.Option("trl", "--format", help="trl, raw or pointwise."),
    aggregate: str = typer.Option("majority", help="majority or bt (Bradley-Terry)."),
    ties_out: Optional[Path] = typer.Option(None, help="Write ties and both-bad items here (default: leave them out)."),
    min_judgments: int = typer.Option(1, min=1, help="Skip items with fewer judgments."),
    db: Optional[str] = DbOpt,
) -> None:
    """Export judgments: TRL preference pairs, raw per-annotator rows, or point-wise (ULMA)."""
    from alignforge.annotate import export as ex

    _, S = _open(db)
    if fmt == "trl":
        r = ex.export_trl(S, out, aggregate, ties_out, min_judgments)
        typer.echo(
            f"wrote {r['pairs']} pairs to {out}; {r['ties']} ties and {r['both_bad']} "
            f"both-bad items " + (f"written to {ties_out}" if ties_out else "left out")
        )
    elif fmt == "raw":
        if ties_out is not None:
            raise AlignforgeError("--ties-out only applies to --format trl")
        typer.echo(f"wrote {ex.export_raw(S, out)} judgments to {out}")
    elif fmt == "pointwise":
        if ties_out is not None:
            raise AlignforgeError("--ties-out only applies to --format trl")
        r = ex.export_pointwise(S, out, aggregate, min_judgments)
        typer.echo(f"wrote {r['rows']} point-wise rows to {out}")
    else:
        raise AlignforgeError(f"unknown format {fmt!r} (expected trl, raw or pointwise)")


@annotate_app.command("agree")
@_friendly
def agree(db: Optional[str] = DbOpt, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Agreement (Cohen's κ per pair, Fleiss' κ, Krippendorff's α) and length bias."""
    from alignforge.annotate.agreement import agreement_report, longer_won_share
    from alignforge.annotate.service import judged_rows

    _, S = _open(db)
    rows = judged_rows(S)
    rep = agreement_report((r["item"].id, r["annotator"], r["judgment"].overall, r["judgment"].both_bad) for r in rows)
    rep["longer_won"] = longer_won_share(
        (r["judgment"].overall, r["judgment"].both_bad, r["item"].response_a, r["item"].response_b) for r in rows
    )
    rep["judgments"] = len(rows)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    typer.echo(f"judgments: {len(rows)}; items with 2+ judgments: {rep['items_with_2plus']}")
    typer.echo(f"Fleiss' kappa: {f(rep['fleiss_kappa'])}")
    typer.echo(f"Krippendorff's alpha (ordinal): {f(rep['krippendorff_alpha_ordinal'])}")
    lw = rep["longer_won"]
    typer.echo(f"longer response won: {f(lw['share'])} of {lw['pairs']} decisive unequal-length judgments")
    for p in rep["cohen"]:
        typer.echo(f"Cohen's kappa {p['a']} / {p['b']}: {f(p['kappa'])} ({p['items']} shared items)")


@users_app.command("add")
@_friendly
def users_add(
    username: str,
    role: str = typer.Option("annotator", help="admin or annotator."),
    password: Optional[str] = typer.Option(
        None, envvar=PASSWORD_ENV, help=f"Password (default: prompt; or ${PASSWORD_ENV})."
    ),
    db: Optional[str] = DbOpt,
) -> None:
    """Add a user."""
    from alignforge.annotate.service import create_user

    if password is None:
        password = os.environ.get(PASSWORD_ENV)  # click treats a set but empty variable as unset
    if password is None:
        try:
            password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
        except typer.Abort:
            raise AlignforgeError(
                f"no password given: type one at the prompt, or use --password or ${PASSWORD_ENV}"
            ) from None
    _, S = _open(db)
    create_user(S, username, password, role)
    typer.echo(f"added {role} {username}")


@users_app.command("set")
@_friendly
def users_set(
    username: str,
    role: Optional[str] = typer.Option(None),
    active: Optional[bool] = typer.Option(None, "--active/--inactive"),
    password: Optional[str] = typer.Option(None, envvar="ALIGNFORGE_ANNOTATE_PASSWORD"),
    db: Optional[str] = DbOpt,
) -> None:
    """Change a user's role, active flag or password (logs the user out)."""
    from alignforge.annotate.service import set_user

    _, S = _open(db)
    set_user(S, username, role=role, active=active, password=password)
    typer.echo(f"updated {username}")


@users_app.command("list")
@_friendly
def users_list(db: Optional[str] = DbOpt, k: int = typer.Option(3, "--k", min=1)) -> None:
    """Users with their progress."""
    from alignforge.annotate.service import all_progress

    _, S = _open(db)
    p = all_progress(S, k)
    for u in p["users"]:
        acc = "-" if u.gold_accuracy is None else f"{100 * u.gold_accuracy:.0f}%"
        typer.echo(
            f"{u.username}\t{u.role}\t{'active' if u.active else 'inactive'}\t"
            f"judged={u.judged}\tskipped={u.skipped}\tgold={acc}"
        )
    typer.echo(
        f"items={p['items']} gold={p['gold_items']} complete={p['complete_items']} "
        f"judgments={p['item_judgments']}/{p['target_judgments']} (+{p['gold_judgments']} on gold)"
    )


# --------------------------------------------------------------------------- pairs


@pairs_app.command("generate")
@_friendly
def pairs_generate(
    prompts: Path = typer.Argument(..., help="Prompt file (any format `data` reads)."),
    out: Path = typer.Option(..., "--out", "-o", help="Pair JSONL to write."),
    model: str = typer.Option("embedded", help="SFT model: embedded, a dir, or a hub id."),
    temperature: float = typer.Option(0.9, min=0.0),
    top_p: float = typer.Option(0.95),
    max_new_tokens: int = typer.Option(128, min=1),
    seed: int = typer.Option(0),
    max_tries: int = typer.Option(4, min=1),
    limit: Optional[int] = typer.Option(None, min=1, help="Use the first N prompts."),
    device: Optional[str] = typer.Option(
        None, help="cpu, cuda or cuda:N (default: CUDA when available, else the CPU)."
    ),
) -> None:
    """Sample two different responses per prompt from an SFT model."""
    from alignforge.inference.pairs import generate_pairs

    rep = generate_pairs(
        prompts,
        out,
        model=model,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        max_tries=max_tries,
        limit=limit,
        device=device,
    )
    typer.echo(rep.summary())
