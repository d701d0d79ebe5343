"""A real Prefect server with basic auth on, as the compose stack runs it.

infra/compose/compose.yaml starts the server with ``PREFECT_SERVER_API_AUTH_STRING`` and gives every
client ``PREFECT_API_AUTH_STRING``. That only protects anything if the server really refuses
requests without the value and a client holding it can still do the whole job. So this starts
``prefect server start`` (SQLite in a temporary ``PREFECT_HOME``, its database migrated first so
startup does not race the migration) and checks both sides over real HTTP:

- refused: no ``Authorization`` header, a wrong password, and a bearer token all get 401, and a
  flow run by a Prefect client without the auth string fails on its first API call and leaves
  nothing on the server;
- allowed: a client with the auth string deploys a flow (``flow.serve``: a deployment plus a
  runner, the cheapest real deploy-and-run path that needs no work pool), triggers it with
  ``prefect deployment run``, and the run, its task and its logs read back COMPLETED through
  the authenticated API;
- the auth string (and its base64 token) appears in no log and no file of the server's home.

Every subprocess gets an environment stripped of the caller's ``PREFECT_*`` variables and its
own ``PREFECT_HOME``, so no profile or earlier test can lend it credentials.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PREFECT = Path(sys.executable).parent / "prefect"
if not PREFECT.exists():
    pytest.skip(
        f"{PREFECT} not found: install the project (pip install -e '.[dev]')",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300

FLOW_FILE = textwrap.dedent(
    """
    import sys

    from prefect import flow, task


    @task
    def double(x: int) -> int:
        return 2 * x


    @flow(log_prints=True)
    def auth_check(x: int = 21) -> int:
        y = double(x)
        print(f"doubled {x} -> {y}")
        return y


    @flow
    def refused_check() -> None:
        print("must never run")


    if __name__ == "__main__":
        if sys.argv[1] == "serve":
            auth_check.serve(name="auth-check")
        else:
            refused_check()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env(home: Path, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), **settings}


def _stop(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and every child of it."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _request(url: str, auth: str | None = None, header: str | None = None, body=None):
    """POST ``body`` (GET if None) to ``url``; returns (HTTP status, decoded JSON or None)."""
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    if auth is not None:
        header = "Basic " + base64.b64encode(auth.encode()).decode()
    if header is not None:
        request.add_header("Authorization", header)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


@pytest.fixture(scope="module")
def server(module_tmp):
    """``prefect server start`` with auth on, on a free 127.0.0.1 port."""
    home = module_tmp("auth-server-home")
    port = _free_port()
    auth = f"admin:{secrets.token_urlsafe(24)}"
    env = _clean_env(
        home,
        PREFECT_SERVER_API_AUTH_STRING=auth,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    upgrade = subprocess.run(
        [str(PREFECT), "server", "database", "upgrade", "-y"],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert upgrade.returncode == 0, upgrade.stdout[-2000:] + upgrade.stderr[-2000:]
    log_path = home / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                # /health is the one path the server lets through without credentials.
                if _request(f"{api}/health")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"api": api, "auth": auth, "home": home, "log": log_path}
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def flow_file(module_tmp) -> Path:
    path = module_tmp("auth-flow") / "auth_flow.py"
    path.write_text(FLOW_FILE)
    return path


def test_the_server_refuses_requests_without_the_auth_string(server, flow_file, tmp_path):
    api, auth = server["api"], server["auth"]
    user, password = auth.split(":", 1)
    assert _request(f"{api}/flows/filter", body={})[0] == 401
    assert _request(f"{api}/flows/filter", auth=f"{user}:{password}x", body={})[0] == 401
    assert _request(f"{api}/flows/filter", header=f"Bearer {password}", body={})[0] == 401
    assert _request(f"{api}/flows/filter", header="Basic not-base64!", body={})[0] == 401
    assert _request(f"{api}/admin/version")[0] == 401
    assert _request(f"{api}/flows/filter", auth=auth, body={})[0] == 200

    client = subprocess.run(
        [sys.executable, str(flow_file), "run"],
        env=_clean_env(tmp_path / "client-home", PREFECT_API_URL=api),
        cwd=flow_file.parent,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = client.stdout + client.stderr
    assert client.returncode != 0, output[-3000:]
    assert "401 Unauthorized" in output, output[-3000:]
    assert "must never run" not in output
    status, flows = _request(
        f"{api}/flows/filter", auth=auth, body={"flows": {"name": {"any_": ["refused-check"]}}}
    )
    assert status == 200 and flows == [], "an unauthenticated client created a flow"


def test_an_authenticated_client_deploys_and_runs_a_flow(server, flow_file, tmp_path):
    api, auth = server["api"], server["auth"]
    env = _clean_env(
        tmp_path / "client-home",
        PREFECT_API_URL=api,
        PREFECT_API_AUTH_STRING=auth,
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    serve_log = tmp_path / "serve.log"
    with serve_log.open("w") as log:
        serve = subprocess.Popen(
            [sys.executable, str(flow_file), "serve"],
            env=env,
            cwd=flow_file.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            status, deployments = _request(
                f"{api}/deployments/filter",
                auth=auth,
                body={"deployments": {"name": {"any_": ["auth-check"]}}},
            )
            assert status == 200
            if deployments:
                break
            if serve.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"flow.serve registered no deployment:\n{serve_log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        (deployment,) = deployments

        trigger = subprocess.run(
            [
                str(PREFECT),
                "deployment",
                "run",
                "auth-check/auth-check",
                "--param",
                "x=5",
                "--watch",
                "--watch-timeout",
                "180",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        trigger_output = trigger.stdout + trigger.stderr
        assert trigger.returncode == 0, trigger_output[-3000:] + serve_log.read_text()[-3000:]

        status, runs = _request(
            f"{api}/flow_runs/filter",
            auth=auth,
            body={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}},
        )
        assert status == 200 and len(runs) == 1, runs
        (run,) = runs
        assert run["state_type"] == "COMPLETED", run["state"]
        assert run["parameters"] == {"x": 5}
        status, task_runs = _request(
            f"{api}/task_runs/filter",
            auth=auth,
            body={"flow_runs": {"id": {"any_": [run["id"]]}}},
        )
        assert status == 200
        assert [(t["task_key"].split("-")[0], t["state_type"]) for t in task_runs] == [
            ("double", "COMPLETED")
        ]
        # Logs travel through their own batching client: they reach the server only if it
        # authenticated too. They can land shortly after the final state.
        deadline = time.monotonic() + 30
        while True:
            status, logs = _request(
                f"{api}/logs/filter",
                auth=auth,
                body={"logs": {"flow_run_id": {"any_": [run["id"]]}}},
            )
            assert status == 200
            if any(entry["message"] == "doubled 5 -> 10" for entry in logs):
                break
            assert time.monotonic() < deadline, [entry["message"] for entry in logs]
            time.sleep(1)
    finally:
        _stop(serve)

    token = base64.b64encode(auth.encode()).decode()
    texts = {
        "serve log": serve_log.read_text(),
        "deployment run output": trigger_output,
        "server log": server["log"].read_text(),
    }
    for name, text in texts.items():
        assert auth.split(":", 1)[1] not in text and token not in text, f"auth string in {name}"
    for path in server["home"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert auth.encode() not in data and token.encode() not in data, path
