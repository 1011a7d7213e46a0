"""Which projects (and which node) a request touches, found in one place for every RPC.

The interceptor asks this before any servicer runs, so a key for project A cannot reach
project B through any RPC, present or future, and a node cannot act for another node:

- a `project` field, at the top level or one message down (`header.project`, every
  `grants[i].project`), names a project; ProjectService names it `name`;
- a `node_id` field names a node: for a node caller it must be itself, for an operator
  it resolves to the node's project;
- other id fields resolve through resolvers the composition root registers (`key_id`
  to the projects of an API key; other areas can add theirs).

A request naming no project is a global operation: only a global grant allows it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

# Returns the projects a resource belongs to, or None when there is no such resource.
Resolver = Callable[[str], Awaitable[Collection[str] | None]]

# Methods whose request names its project in a field not called `project`.
PROJECT_FIELD = {
    "/controlplane.project.v1.ProjectService/GetProject": "name",
}
# Methods that act on no existing project whatever their fields say (creating one).
GLOBAL_METHODS = frozenset({"/controlplane.project.v1.ProjectService/CreateProject"})

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


@dataclass(frozen=True, slots=True)
class Scope:
    projects: frozenset[str] = frozenset()
    node_ids: frozenset[str] = frozenset()
    # Resolved from ids (a node's project, a key's projects): not checked for nodes,
    # whose node_id is checked against themselves instead.
    resolved: frozenset[str] = frozenset()
    # An id named a resource that does not exist: the servicer will say NOT_FOUND.
    unknown: bool = False

    @property
    def all_projects(self) -> frozenset[str]:
        return self.projects | self.resolved


@dataclass(frozen=True, slots=True)
class _Paths:
    projects: tuple[tuple[str, ...], ...]
    ids: tuple[tuple[str, str], ...]  # (field name, resolver name); "node_id" included


@dataclass
class ScopeFinder:
    resolvers: Mapping[str, Resolver] = field(default_factory=dict)
    _paths: dict[tuple[str, str], _Paths] = field(default_factory=dict)

    async def scope(self, method: str, request: Message | None, resolve: bool = True) -> Scope:
        """The request's scope; `resolve` False (node callers) names node ids without
        looking up their projects, so a node's call reads nothing."""
        if request is None or method in GLOBAL_METHODS:
            return Scope()
        paths = self._paths_for(method, request.DESCRIPTOR)  # type: ignore[arg-type]
        projects = {v for p in paths.projects for v in _values(request, p) if v}
        node_ids: set[str] = set()
        resolved: set[str] = set()
        unknown = False
        for name, resolver_name in paths.ids:
            value = getattr(request, name)
            if not value:
                continue
            if name == "node_id":
                node_ids.add(value)
            resolver = self.resolvers.get(resolver_name)
            if not resolve or resolver is None:
                continue
            found = await resolver(value)
            if found is None:
                unknown = True
            else:
                resolved.update(found)
        return Scope(frozenset(projects), frozenset(node_ids), frozenset(resolved), unknown)

    def _paths_for(self, method: str, descriptor: Descriptor) -> _Paths:
        key = (method, descriptor.full_name)
        found = self._paths.get(key)
        if found is None:
            found = self._paths[key] = self._discover(method, descriptor)
        return found

    def _discover(self, method: str, descriptor: Descriptor) -> _Paths:
        project_field = PROJECT_FIELD.get(method, "project")
        projects: list[tuple[str, ...]] = []
        ids: list[tuple[str, str]] = []
        for f in descriptor.fields:
            if f.type == _STRING and not f.is_repeated:
                if f.name == project_field:
                    projects.append((f.name,))
                elif f.name == "node_id" or f.name in self.resolvers:
                    ids.append((f.name, f.name))
            elif f.type == _MESSAGE and f.message_type is not None:
                inner = f.message_type.fields_by_name.get("project")
                if inner is not None and inner.type == _STRING and not inner.is_repeated:
                    projects.append((f.name, "project"))
        return _Paths(tuple(projects), tuple(ids))


def _values(message: Message, path: tuple[str, ...]) -> list[str]:
    """The strings at `path`: a field, a field of a message field, or of each element of
    a repeated message field."""
    if len(path) == 1:
        value = getattr(message, path[0])
        return [value] if isinstance(value, str) else []
    outer, name = path
    field = message.DESCRIPTOR.fields_by_name[outer]
    if field.is_repeated:
        return [getattr(item, name) for item in getattr(message, outer)]
    if not message.HasField(outer):
        return []
    return [getattr(getattr(message, outer), name)]


class CachedResolver:
    """A resolver for resources whose project never changes (a node stays in the project
    it registered in): each id is looked up once, then answered from memory."""

    # Beyond this many ids the cache starts over: a lookup is only one indexed read.
    MAX = 100_000

    def __init__(self, lookup: Resolver):
        self._lookup = lookup
        self._known: dict[str, Collection[str]] = {}

    async def __call__(self, resource_id: str) -> Collection[str] | None:
        found = self._known.get(resource_id)
        if found is None:
            found = await self._lookup(resource_id)
            if found is None:
                return None
            if len(self._known) >= self.MAX:
                self._known.clear()
            self._known[resource_id] = found
        return found
