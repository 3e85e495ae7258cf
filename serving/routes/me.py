"""A person's own data: consent, restriction, objection, access/portability, erasure (person token).

The subject is always the token's ``sub``: there is no way to name someone else here. Handlers
that read or append to the ledger are plain ``def`` (FastAPI's thread pool) or hand their work to
a thread: the event loop never waits on SQL.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, status

from features.events import ConsentPurpose
from features.privacy import rights
from features.privacy.ledger import LedgerError
from features.privacy.registry import CONSENT_SCOPES
from serving import explain
from serving.deps import PersonCaller, ServicesDep
from serving.modelset import ModelUnavailable
from serving.schemas import ConsentIn, ConsentItem, ConsentOut, ErasureOut, ObjectionIn, RestrictionIn
from serving.services import Services

router = APIRouter(prefix="/v1/me", tags=["your data and rights"])

COLLECTED_VIA = "api"
MAX_EXPLAINED = 200


def consent_view(svc: Services, subject: str) -> ConsentOut:
    state = svc.ledger.state(subject)
    items = []
    for purpose in ConsentPurpose:
        c = state.consent(purpose)
        items.append(
            ConsentItem(
                purpose=purpose.value,
                status=c.status.value,
                valid=c.valid,
                since=c.event_time,
                covers=list(CONSENT_SCOPES.get(purpose, ())),
            )
        )
    return ConsentOut(
        subject_id=subject, consents=items, restricted=state.restricted, objections=sorted(state.objections)
    )


@router.get("/consent", response_model=ConsentOut, summary="Your consents, restriction and objections")
def get_consent(svc: ServicesDep, caller: PersonCaller) -> ConsentOut:
    assert caller.subject is not None
    return consent_view(svc, caller.subject)


@router.put(
    "/consent",
    response_model=ConsentOut,
    summary="Give, renew, refuse or withdraw a consent",
    description="Takes effect on your very next request (Art 7(3)).",
)
def put_consent(body: ConsentIn, svc: ServicesDep, caller: PersonCaller) -> ConsentOut:
    assert caller.subject is not None
    try:
        rights.set_consent(
            caller.subject, body.purpose.value, body.status, svc.ledger, collection_method=COLLECTED_VIA
        )
    except LedgerError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    return consent_view(svc, caller.subject)


@router.post(
    "/restriction",
    response_model=ConsentOut,
    summary="Restrict processing (Art 18) or lift the restriction",
    description="While restricted you are never profiled and fraud decisions about you go to a human.",
)
def restriction(body: RestrictionIn, svc: ServicesDep, caller: PersonCaller) -> ConsentOut:
    assert caller.subject is not None
    rights.restrict(caller.subject, svc.ledger, lift=not body.active, collection_method=COLLECTED_VIA)
    return consent_view(svc, caller.subject)


@router.post(
    "/objection",
    response_model=ConsentOut,
    summary="Object to a purpose (Art 21) or withdraw the objection",
    description="`*` objects to every purpose based on legitimate interest or profiling.",
)
def objection(body: ObjectionIn, svc: ServicesDep, caller: PersonCaller) -> ConsentOut:
    assert caller.subject is not None
    rights.object_to(
        caller.subject, body.purpose, svc.ledger, withdraw=not body.active, collection_method=COLLECTED_VIA
    )
    return consent_view(svc, caller.subject)


def _explanations(svc: Services, subject: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in svc.decisions.for_subject(subject, limit=MAX_EXPLAINED):
        if d["source"] != "automated":
            continue
        bundle = None
        note = None
        if d["model_name"] and d["model_version"]:
            try:
                bundle = svc.models.version(d["model_name"], d["model_version"])
            except ModelUnavailable as exc:
                note = str(exc)
        exp = explain.build(
            d,
            bundle,
            svc.registry,
            svc.feature_defs,
            svc.decisions.reviews_for_decision(d["id"]),
            svc.decisions.superseded_by(d["id"]),
            note,
        )
        out[d["id"]] = exp.model_dump(mode="json")
    return out


@router.get(
    "/export",
    summary="Everything held about you (access, portability)",
    description="One JSON document: provided and observed events, derived features, decisions with their "
    "explanations, consent history (Arts 15, 20).",
)
async def export(svc: ServicesDep, caller: PersonCaller) -> dict[str, Any]:
    subject = caller.subject
    assert subject is not None

    def build() -> dict[str, Any]:
        doc = rights.export_subject(subject, ledger=svc.ledger, settings=svc.settings)
        doc["explanations"] = _explanations(svc, subject)
        return doc

    return await anyio.to_thread.run_sync(build)


@router.delete(
    "",
    response_model=ErasureOut,
    summary="Erase your data (Art 17)",
    description="Removes you from online stores, offline tables, decision logs and the consent ledger; a "
    "minimal record of the erasure is kept as proof for a limited time.",
)
async def erase(svc: ServicesDep, caller: PersonCaller) -> ErasureOut:
    from features.privacy.erasure import TOMBSTONE_LEGAL_BASIS, erase_subject

    subject = caller.subject
    assert subject is not None
    report = await anyio.to_thread.run_sync(
        lambda: erase_subject(subject, engine=svc.engine, settings=svc.settings, now=dt.datetime.now(dt.UTC))
    )
    svc.profiles.set(subject, None)
    return ErasureOut(
        subject_id=subject, erased_at=report.erased_at, counts=report.to_dict(), kept=TOMBSTONE_LEGAL_BASIS
    )
