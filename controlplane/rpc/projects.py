from __future__ import annotations

import grpc

from controlplane.api.project.v1 import project_pb2, project_pb2_grpc
from controlplane.domain.projects import ProjectDirectory
from controlplane.rpc import convert


class ProjectServicer(project_pb2_grpc.ProjectServiceServicer):
    def __init__(self, projects: ProjectDirectory):
        self._projects = projects

    async def CreateProject(
        self, request: project_pb2.CreateProjectRequest, context: grpc.aio.ServicerContext
    ) -> project_pb2.CreateProjectResponse:
        project, token = await self._projects.create(request.name)
        return project_pb2.CreateProjectResponse(project=convert.project_out(project), enrollment_token=token)

    async def GetProject(
        self, request: project_pb2.GetProjectRequest, context: grpc.aio.ServicerContext
    ) -> project_pb2.GetProjectResponse:
        return project_pb2.GetProjectResponse(
            project=convert.project_out(await self._projects.get(request.name))
        )

    async def ListProjects(
        self, request: project_pb2.ListProjectsRequest, context: grpc.aio.ServicerContext
    ) -> project_pb2.ListProjectsResponse:
        projects = await self._projects.all()
        return project_pb2.ListProjectsResponse(projects=[convert.project_out(p) for p in projects])
