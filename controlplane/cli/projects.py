"""`controlplane projects ...`"""

from __future__ import annotations

import click

from controlplane.api.project.v1 import project_pb2, project_pb2_grpc
from controlplane.cli.client import call, channel, project_option, server_option
from controlplane.cli.output import OutputGroup


@click.group(cls=OutputGroup)
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


@projects.command("get")
@server_option
@click.argument("name")
def project_get(server: str, name: str) -> None:
    """Show a project and its rollout policy."""
    stub = project_pb2_grpc.ProjectServiceStub(channel(server))
    call(lambda: stub.GetProject(project_pb2.GetProjectRequest(name=name)), show_defaults=True)


@projects.group("policy")
def policy() -> None:
    """A project's rollout policy (admins of the project)."""


@policy.command("set")
@server_option
@project_option
@click.option(
    "--min-approvals",
    type=click.IntRange(min=0),
    required=True,
    help="Approvals every rollout of the project waits for, at least (0: the creator decides).",
)
def policy_set(server: str, project: str, min_approvals: int) -> None:
    """Replace the project's rollout policy; prints the policy now in force."""
    stub = project_pb2_grpc.ProjectServiceStub(channel(server))
    request = project_pb2.UpdateProjectPolicyRequest(
        project=project, policy=project_pb2.ProjectPolicy(min_approvals=min_approvals)
    )
    call(lambda: stub.UpdateProjectPolicy(request), show_defaults=True)
