"""The first `make run` on a fresh machine: Prefect's local API starting from an empty PREFECT_HOME.

On a slow machine the first start failed with "Timed out while attempting to connect to ephemeral
Prefect API server": it creates and migrates the SQLite database, which took longer than Prefect's
20 s default wait. Two defences, each tested from an empty home with the settings `make run` uses
(read from the Makefile, so they cannot drift): the install step migrates the database ahead of
time (its exact command is taken from `make -n`), and the local API waits long enough even when
nothing was migrated. Each case runs a tiny real flow in a fresh process through that API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = REPO / "Makefile"

_TINY_FLOW = textwrap.dedent(
    """
    import json, time
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from flows.main import local_api

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow(name="cold-start")
    def tiny(x: int) -> int:
        return double(x)

    started = time.monotonic()
    with local_api():
        ready = time.monotonic() - started
        state = tiny(21, return_state=True)
        with get_client(sync_client=True) as client:
            recorded = client.read_flow_run(state.state_details.flow_run_id).state.type.value
    print(json.dumps({"result": state.result(), "recorded": recorded, "ready_s": ready}))
    """
)


def run_settings() -> dict[str, str]:
    """The environment `make run` gives Python: the Makefile's exports and the run recipe's variables."""
    text = MAKEFILE.read_text()
    settings = dict(re.findall(r"^export (PREFECT_\w+) \?= (\S+)$", text, re.MULTILINE))
    recipe = text.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    settings.update(re.findall(r"\b(PREFECT_\w+)=(\S+)", recipe))
    settings.pop("PREFECT_HOME")  # the test's own, empty home instead of the checkout's
    return settings


def fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(run_settings(), PREFECT_HOME=str(home), PYTHONPATH=str(REPO))
    return env


def install_migration() -> str:
    """The line of the install step that migrates Prefect's database, as `make` would run it."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry_run = subprocess.run(
        ["make", "-s", "-n", "-W", "pyproject.toml", ".venv/.installed"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (line,) = [
        cmd for cmd in dry_run.splitlines() if "database upgrade" in cmd and "echo" not in cmd
    ]
    return line


def test_make_run_waits_longer_than_prefects_default():
    settings = run_settings()
    assert int(settings["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 600
    assert settings["PREFECT_LOGGING_EXTRA_LOGGERS"] == "dala_model"


def test_first_run_from_an_empty_prefect_home(tmp_path):
    """No install step ran: the local API creates the database itself and the run waits for it."""
    home = tmp_path / "prefect-home"
    env = fresh_env(home)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _TINY_FLOW],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    total_s = time.monotonic() - started
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["result"] == 42 and outcome["recorded"] == "COMPLETED"
    wait = env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
    assert f"starting Prefect's local API (waiting up to {wait} s" in done.stdout
    assert _flow_runs(home / "prefect.db") == 1  # the run went through this new database
    print(f"cold start: API ready after {outcome['ready_s']:.1f} s, whole run {total_s:.1f} s")


def test_install_step_migrates_an_empty_home_to_the_servers_schema(tmp_path):
    """What `make install` leaves is the schema a server would create: nothing left to migrate."""
    home = tmp_path / "prefect-home"
    started = time.monotonic()
    subprocess.run(
        install_migration(), shell=True, cwd=REPO, env=fresh_env(home), check=True, timeout=600
    )
    print(f"install-time migration of an empty home: {time.monotonic() - started:.1f} s")
    with sqlite3.connect(home / "prefect.db") as db:
        (revision,) = db.execute("select version_num from alembic_version").fetchone()
    assert revision == _head_revision()
    assert _flow_runs(home / "prefect.db") == 0


def _flow_runs(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("select count(*) from flow_run").fetchone()[0]


def _head_revision() -> str:
    """The newest SQLite migration shipped with the installed Prefect (what a server upgrades to)."""
    import prefect.server.database
    from alembic.script import ScriptDirectory

    migrations = Path(prefect.server.database.__file__).parent / "_migrations"
    scripts = ScriptDirectory(
        str(migrations), version_locations=[str(migrations / "versions" / "sqlite")]
    )
    (head,) = scripts.get_heads()
    return head
