from __future__ import annotations

import grpc

from controlplane.api.project.v1 import project_pb2, project_pb2_grpc
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.fleet import Project
from controlplane.domain.model.policy import ProjectPolicy
from controlplane.domain.projects import ProjectDirectory
from controlplane.rpc import convert


class ProjectServicer(project_pb2_grpc.ProjectServiceServicer):
    def __init__(self, projects: ProjectDirectory):
        self._projects = projects

    async def CreateProject(
        self, request: project_pb2.CreateProjectRequest, context: grpc.aio.ServicerContext
    ) -> project_pb2.CreateProjectResponse:
        project, token = await self._projects.create(request.name)
        return project_pb2.CreateProjectResponse(
            project=_project_out(project, ProjectPolicy()), enrollment_token=token
        )

    async def GetProject(
        self, request: project_pb2.GetProjectRequest, context: grpc.aio.ServicerContext
    ) -> project_pb2.GetProjectResponse:
        return project_pb2.GetProjectResponse(project=_project_out(*await self._projects.get(request.name)))

    async def ListProjects(
        self, request: project_pb2.ListProjectsRequest, context: grpc.aio.ServicerContext
    ) -> project_pb2.ListProjectsResponse:
        found = await self._projects.all()
        return project_pb2.ListProjectsResponse(projects=[_project_out(*p) for p in found])

    async def UpdateProjectPolicy(
        self, request: project_pb2.UpdateProjectPolicyRequest, context: grpc.aio.ServicerContext
    ) -> project_pb2.UpdateProjectPolicyResponse:
        if not request.HasField("policy"):
            raise InvalidArgument("give the whole new policy", field="policy")
        policy = await self._projects.set_policy(request.project, _policy_in(request.policy))
        return project_pb2.UpdateProjectPolicyResponse(policy=_policy_out(policy))


def _project_out(project: Project, policy: ProjectPolicy) -> project_pb2.Project:
    message = convert.project_out(project)
    message.policy.CopyFrom(_policy_out(policy))
    return message


def _policy_in(message: project_pb2.ProjectPolicy) -> ProjectPolicy:
    return ProjectPolicy(min_approvals=message.min_approvals)


def _policy_out(policy: ProjectPolicy) -> project_pb2.ProjectPolicy:
    return project_pb2.ProjectPolicy(min_approvals=policy.min_approvals)
