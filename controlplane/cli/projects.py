"""`controlplane projects ...`"""

from __future__ import annotations

import click

from controlplane.api.project.v1 import project_pb2, project_pb2_grpc
from controlplane.cli.client import call, channel, server_option


@click.group()
def projects() -> None:
    """Projects."""


@projects.command("create")
@server_option
@click.argument("name")
def project_create(server: str, name: str) -> None:
    """Create a project; prints its enrollment token once."""
    stub = project_pb2_grpc.ProjectServiceStub(channel(server))
    call(lambda: stub.CreateProject(project_pb2.CreateProjectRequest(name=name)))


@projects.command("list")
@server_option
def project_list(server: str) -> None:
    stub = project_pb2_grpc.ProjectServiceStub(channel(server))
    call(lambda: stub.ListProjects(project_pb2.ListProjectsRequest()))
