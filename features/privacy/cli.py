"""`aipic privacy …`: the purposes table, consent, and data-subject rights from the shell.

Every command migrates the service database first (cheap when already at head) and prints
JSON, except `purposes` which prints the markdown table the README includes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from features.cli import fail

privacy_app = typer.Typer(help="Purposes, consent and data-subject rights.", no_args_is_help=True)

T = TypeVar("T")
METHOD_HELP = "How the request reached us (recorded on the receipt)."


def _ledger() -> Any:
    from features.migrations import migrate
    from features.privacy.ledger import ConsentLedger

    migrate()
    return ConsentLedger()


def _run(action: Callable[[], T]) -> T:
    """Run ``action`` turning expected errors into a one-line message and exit code 2."""
    from features.privacy.erasure import ErasureError
    from features.privacy.ledger import LedgerError
    from features.privacy.registry import PurposeViolation, RegistryError
    from features.storage import SchemaError

    try:
        return action()
    except (
        LedgerError,
        RegistryError,
        PurposeViolation,
        ErasureError,
        SchemaError,
        FileNotFoundError,
    ) as exc:
        raise fail(str(exc)) from None


def _echo(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _parse_time(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@privacy_app.command("purposes")
def purposes_cmd(
    with_features: Annotated[
        bool, typer.Option("--features/--no-features", help="Add tiers × features.")
    ] = False,
) -> None:
    """Print the purposes × categories × legal basis table (markdown) from the registry."""
    from features.privacy.registry import RegistryError, declared_features, purposes_markdown

    def build() -> str:
        feats = None
        if with_features:
            try:
                feats = declared_features()
            except RegistryError:
                feats = None
        return purposes_markdown(features=feats)

    typer.echo(_run(build), nl=False)


@privacy_app.command("migrate")
def migrate_cmd() -> None:
    """Upgrade the service database (consent ledger and other service tables) to the newest schema."""
    from features.migrations import current_revisions, migrate

    migrate()
    _echo({"revisions": sorted(current_revisions())})


@privacy_app.command("import-consent")
def import_consent_cmd(
    events: Annotated[Path | None, typer.Option(help="Directory with consent_events.parquet.")] = None,
) -> None:
    """Append the consent events of a data directory to the ledger (idempotent)."""
    from features.settings import get_settings

    led = _ledger()
    report = _run(lambda: led.import_events_dir(events or get_settings().events_dir))
    _echo(report.__dict__)


@privacy_app.command("decide")
def decide_cmd(
    subject: Annotated[str, typer.Argument(help="Person id (user_id).")],
    purpose: Annotated[str, typer.Argument(help="Registry purpose, e.g. personalised_recommendations.")],
    dob: Annotated[str | None, typer.Option(help="Declared date of birth, YYYY-MM-DD.")] = None,
) -> None:
    """Show which tier the gate allows for SUBJECT and PURPOSE right now, and why."""
    from features.privacy.gate import SubjectProfile, decide
    from features.privacy.ledger import now_utc

    led = _ledger()
    try:
        birth = dt.date.fromisoformat(dob) if dob else None
    except ValueError:
        raise fail(f"not a date: {dob!r}") from None
    decision = _run(lambda: decide(subject, purpose, now_utc(), led, SubjectProfile(subject, birth)))
    _echo(decision.to_log())


@privacy_app.command("export")
def export_cmd(
    subject: Annotated[str, typer.Argument(help="Person id (user_id).")],
    out: Annotated[Path | None, typer.Option(help="Write the JSON here instead of stdout.")] = None,
    online: Annotated[
        bool, typer.Option("--online/--no-online", help="Include online feature values.")
    ] = True,
) -> None:
    """Access and portability: everything held about SUBJECT as one JSON document."""
    from features.privacy.rights import export_subject

    led = _ledger()
    doc = _run(lambda: export_subject(subject, ledger=led, include_online=online))
    if out is None:
        _echo(doc)
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(out)
    typer.echo(str(out))


@privacy_app.command("erase")
def erase_cmd(
    subject: Annotated[str, typer.Argument(help="Person id (user_id).")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False,
) -> None:
    """Erasure: remove SUBJECT from online stores, offline tables, decision logs and the ledger."""
    from rich.console import Console

    from features.privacy.erasure import erase_subject

    if not yes:
        raise fail("erasure cannot be undone: repeat with --yes")
    led = _ledger()
    with Console(stderr=True).status(f"erasing {subject} …"):
        report = _run(lambda: erase_subject(subject, engine=led.engine))
    _echo(report.to_dict())


@privacy_app.command("restrict")
def restrict_cmd(
    subject: Annotated[str, typer.Argument(help="Person id (user_id).")],
    lift: Annotated[bool, typer.Option("--lift", help="End the restriction.")] = False,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "cli",
) -> None:
    """Restriction of processing (Art 18): the person is no longer profiled; data kept, not used."""
    from features.privacy.rights import restrict

    led = _ledger()
    receipt = _run(lambda: restrict(subject, led, lift=lift, collection_method=method))
    _echo({"receipt_id": receipt, "restricted": not lift})


@privacy_app.command("object")
def object_cmd(
    subject: Annotated[str, typer.Argument(help="Person id (user_id).")],
    purpose: Annotated[str, typer.Option(help="Registry purpose objected to, or * for all.")] = "*",
    withdraw: Annotated[bool, typer.Option("--withdraw", help="Withdraw the objection.")] = False,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "cli",
) -> None:
    """Objection (Art 21): honoured at once for personalisation; fraud decisions go to a person."""
    from features.privacy.rights import object_to

    led = _ledger()
    receipt = _run(lambda: object_to(subject, purpose, led, withdraw=withdraw, collection_method=method))
    _echo({"receipt_id": receipt, "purpose": purpose, "objecting": not withdraw})


@privacy_app.command("consent-get")
def consent_get_cmd(subject: Annotated[str, typer.Argument(help="Person id (user_id).")]) -> None:
    """Current consent per purpose and the full history."""
    from features.privacy.rights import get_consent

    led = _ledger()
    _echo(_run(lambda: get_consent(subject, led)))


@privacy_app.command("consent-set")
def consent_set_cmd(
    subject: Annotated[str, typer.Argument(help="Person id (user_id).")],
    purpose: Annotated[str, typer.Argument(help="Consent purpose, e.g. personalised_recommendations.")],
    status: Annotated[str, typer.Argument(help="DPV status: given, renewed, refused, withdrawn, ...")],
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "cli",
    jurisdiction: Annotated[str, typer.Option(help="Jurisdiction of the receipt.")] = "EU",
) -> None:
    """Append a consent record (giving and withdrawing are equally easy); effective immediately."""
    from features.privacy.rights import set_consent

    led = _ledger()
    receipt = _run(
        lambda: set_consent(
            subject, purpose, status, led, collection_method=method, jurisdiction=jurisdiction
        )
    )
    _echo({"receipt_id": receipt, "purpose": purpose, "status": status})


@privacy_app.command("enforce-retention")
def enforce_retention_cmd(
    now: Annotated[str | None, typer.Option(help="Reference time (ISO 8601); default now.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count only; change nothing.")] = False,
) -> None:
    """Delete or anonymise everything past its retention period (per data category, configurable)."""
    from features.privacy.retention import enforce_retention

    led = _ledger()
    when = _parse_time(now)
    report = _run(lambda: enforce_retention(now=when, engine=led.engine, dry_run=dry_run))
    _echo(report.to_dict())
