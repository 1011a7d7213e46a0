"""Who is acting: the actor and request of the current call, carried in context
variables so the domain never passes identities around by hand."""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class ActorKind(enum.StrEnum):
    OPERATOR = "operator"
    NODE = "node"
    SYSTEM = "system"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Actor:
    kind: ActorKind
    id: str
    project: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.id}"


ANONYMOUS = Actor(ActorKind.ANONYMOUS, "anonymous")


_actor: contextvars.ContextVar[Actor] = contextvars.ContextVar("actor", default=ANONYMOUS)


_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current_actor() -> Actor:
    return _actor.get()


def current_request_id() -> str:
    return _request_id.get()


def set_context(actor: Actor, request_id: str) -> None:
    _actor.set(actor)
    _request_id.set(request_id)


@contextmanager
def acting_as(actor: Actor, request_id: str = "") -> Iterator[None]:
    """Run a block as `actor` (background jobs act as the system)."""
    actor_token = _actor.set(actor)
    request_token = _request_id.set(request_id)
    try:
        yield
    finally:
        _actor.reset(actor_token)
        _request_id.reset(request_token)


def system(job: str) -> Actor:
    return Actor(ActorKind.SYSTEM, job)
