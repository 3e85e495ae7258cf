"""`aipic serve`, `aipic auth ...` and `aipic models reload` (registered in `serving.cli`).

Keys and tokens are printed once to stdout and never logged. Heavy imports stay inside the
commands.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Annotated

import typer

auth_app = typer.Typer(help="API keys (backend) and person tokens (development).", no_args_is_help=True)
models_app = typer.Typer(help="Models served by the API.", no_args_is_help=True)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


def configure_logging(level: str = "INFO") -> None:
    """One line per event, no personal data: the service logs ids, tiers and timings only."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    access_log: Annotated[bool, typer.Option(help="uvicorn access log (contains client addresses).")] = False,
) -> None:
    """Run the API (one uvicorn worker; models load from the MLflow registry at start)."""
    import uvicorn

    from features.settings import get_settings
    from serving.app import create_app

    configure_logging(log_level)
    try:
        app = create_app(get_settings())
    except Exception as exc:  # bad settings: a message, not a traceback
        _fail(str(exc))
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        loop="uvloop",
        http="httptools",
        server_header=False,
        date_header=False,
    )


@auth_app.command("create-key")
def create_key(
    scopes: Annotated[str, typer.Option(help="Comma-separated: score, recommend, events, support, admin.")],
    label: Annotated[str, typer.Option(help="Who or what the key is for.")] = "",
) -> None:
    """Create an API key and print it (shown once; only its hash is stored)."""
    from features.db import engine_for
    from features.settings import get_settings
    from serving.auth import ApiKeyStore, ScopeError
    from serving.decisions import ensure_tables

    engine = engine_for(get_settings().resolved_database_url)
    ensure_tables(engine)
    try:
        key_id, key = ApiKeyStore(engine).create(scopes, label)
    except ScopeError as exc:
        _fail(str(exc))
    typer.secho(f"key id {key_id} (scopes: {scopes}); store the key now, it is not shown again:", err=True)
    typer.echo(key)


@auth_app.command("revoke-key")
def revoke_key(key_id: Annotated[str, typer.Argument(help="The key id (the part after 'aipic_').")]) -> None:
    """Revoke an API key (effective within the service's key cache time, 5 s)."""
    from features.db import engine_for
    from features.settings import get_settings
    from serving.auth import ApiKeyStore
    from serving.decisions import ensure_tables

    engine = engine_for(get_settings().resolved_database_url)
    ensure_tables(engine)
    if not ApiKeyStore(engine).revoke(key_id):
        _fail(f"no active key {key_id}")
    typer.echo(f"revoked {key_id}")


@auth_app.command("list-keys")
def list_keys() -> None:
    """Key ids, labels, scopes and state (never the keys)."""
    from features.db import engine_for
    from features.settings import get_settings
    from serving.auth import ApiKeyStore
    from serving.decisions import ensure_tables

    engine = engine_for(get_settings().resolved_database_url)
    ensure_tables(engine)
    for row in ApiKeyStore(engine).list():
        state = "revoked" if row["revoked_at"] else "active"
        typer.echo(f"{row['key_id']}\t{state}\t{','.join(row['scopes'])}\t{row['label']}")  # type: ignore[arg-type]


@auth_app.command("issue-token")
def issue_token_cmd(
    subject: Annotated[str, typer.Option(help="The person's user id (token `sub`).")],
    minutes: Annotated[int, typer.Option(help="Lifetime in minutes.", min=1, max=60 * 24 * 30)] = 60,
) -> None:
    """Print a person token (JWT) for development and tests; production tokens come from the marketplace."""
    from features.settings import get_settings
    from serving.auth import AuthError, issue_token

    try:
        token = issue_token(get_settings(), subject, dt.timedelta(minutes=minutes))
    except AuthError as exc:
        _fail(str(exc))
    typer.echo(token)


@models_app.command("reload")
def reload_models(
    url: Annotated[str, typer.Option(help="Base URL of the running API.")] = "http://127.0.0.1:8000",
    key: Annotated[
        str | None,
        typer.Option(envvar="AIPIC_API_KEY", help="Admin API key (or AIPIC_API_KEY).", show_default=False),
    ] = None,
) -> None:
    """Ask the running API to pick up newly promoted champions now (atomic swap)."""
    import httpx

    if not key:
        _fail("an admin API key is needed: --key or AIPIC_API_KEY (aipic auth create-key --scopes admin)")
    try:
        resp = httpx.post(
            f"{url.rstrip('/')}/v1/admin/models/reload", headers={"X-API-Key": str(key)}, timeout=120
        )
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url}: {type(exc).__name__}")
    if resp.status_code != 200:
        _fail(f"reload refused ({resp.status_code}): {resp.text[:300]}")
    body = resp.json()
    typer.echo(json.dumps(body, indent=2))


@models_app.command("list")
def list_models() -> None:
    """Champion version of every model the API serves."""
    from features.settings import get_settings
    from serving.modelset import DEFAULT_MODELS
    from training.registry import champion_version, configure

    configure(get_settings())
    for name in DEFAULT_MODELS:
        typer.echo(f"{name}\t{champion_version(name) or 'not registered'}")
