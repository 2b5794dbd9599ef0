"""The two distributions, built from a clean copy of the repository (what git tracks, without
generated code or .venv): the client wheel carries the generated ``tally.v1`` code and the
retry service config and installs alone, with nothing of the server, into a fresh venv that
then calls the running server; the server wheel adds the server and, without its
``embedded`` extra, refuses to start without a database, naming the extra.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess

pytestmark = pytest.mark.slow

SERVER_ONLY = ("pgserver", "sqlalchemy", "asyncpg", "alembic", "xlsxwriter", "prometheus-client")


def _run(*args: str | Path, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _clean_copy(dest: Path) -> Path:
    """The working tree's tracked and new (not ignored) files, as a fresh clone has them."""
    listed = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    repo = _clean_copy(tmp_path_factory.mktemp("repo"))
    assert not (repo / "clients" / "tally").exists()
    dist = tmp_path_factory.mktemp("dist")
    # The build requirements are in the test venv already (no isolated build, no network).
    for project in (repo / "clients", repo):
        _run(
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            dist,
            project,
            cwd=repo,
        )
    yield dist


def _wheel(dist: Path, name: str) -> Path:
    (found,) = dist.glob(f"{name}-*.whl")
    return found


def _metadata(wheel: Path) -> tuple[list[str], list[str]]:
    """(Requires-Dist, Provides-Extra) of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        (meta,) = (n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(z.read(meta).decode())
    return message.get_all("Requires-Dist") or [], message.get_all("Provides-Extra") or []


def test_wheels_hold_what_they_should(wheels: Path) -> None:
    client = _wheel(wheels, "tally_metering_client")
    server = _wheel(wheels, "tally_metering_server")
    with zipfile.ZipFile(client) as z:
        names = set(z.namelist())
        config = json.loads(z.read("tally/v1/service_config.json"))
    for module in (
        "accounts",
        "credits",
        "ledger",
        "metering",
        "funding",
        "notification",
        "account",
    ):
        assert f"tally/v1/{module}_pb2.py" in names
        assert f"tally/v1/{module}_pb2.pyi" in names
    assert {"tally/__init__.py", "tally/v1/credits_pb2_grpc.py", "tally/v1/py.typed"} <= names
    assert {"tally_client/client.py", "tally_client/cli.py", "tally_client/py.typed"} <= names
    assert not any(n.startswith(("tally_service/", "build_protos")) for n in names)
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]

    requires, _ = _metadata(client)
    assert sorted(re.split(r"[<>=!~; \[]", r)[0] for r in requires) == [
        "googleapis-common-protos",
        "grpcio",
        "grpcio-status",
        "protobuf",
    ]

    with zipfile.ZipFile(server) as z:
        names = set(z.namelist())
    assert "tally_service/server.py" in names
    assert any(n.startswith("tally_service/migrations/versions/") for n in names)
    assert not any(n.startswith(("tally/", "tally_client/")) for n in names)
    requires, extras = _metadata(server)
    version = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]["version"]
    assert f"tally-metering-client=={version}" in requires
    assert "embedded" in extras
    assert any(r.startswith("pgserver") and "extra ==" in r for r in requires)
    assert not any(r.startswith("pgserver") and "extra" not in r for r in requires)


CLIENT_SCRIPT = """
import sys, uuid
from importlib import metadata
from tally_client import TallyClient
account = "pkg-" + uuid.uuid4().hex[:12]
with TallyClient(sys.argv[1]) as tally:
    tally.create_account(account)
    tally.top_up(account, "12.5")
    print(account, tally.get_balance(account).available)
"""


def test_client_wheel_alone_calls_the_server(
    wheels: Path, server: ServerProcess, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    client = _wheel(wheels, "tally_metering_client")
    # The wheel's dependencies come from wherever pip is configured to find them.
    _run(python, "-m", "pip", "install", "--quiet", "--find-links", wheels, client, cwd=tmp_path)

    installed = _run(python, "-m", "pip", "list", "--format=json", cwd=tmp_path)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(installed)}
    assert "tally-metering-client" in names
    assert not names & {*SERVER_ONLY, "tally-metering-server"}, names

    # From a folder of its own: nothing of the repository is importable.
    out = _run(python, "-c", CLIENT_SCRIPT, server.target, cwd=tmp_path)
    account, available = out.split()
    assert available == "12.5"
    out = _run(
        venv / "bin" / "tallyctl", "--target", server.target, "balance", account, cwd=tmp_path
    )
    assert "12.5" in out

    # The server on top, without its `embedded` extra: no database, a clear refusal.
    server_wheel = _wheel(wheels, "tally_metering_server")
    _run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--find-links",
        wheels,
        server_wheel,
        cwd=tmp_path,
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TALLY_DATABASE_URL")
    }
    result = subprocess.run(
        [str(venv / "bin" / "tally"), "serve", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "TALLY_DATABASE_URL" in result.stderr and "[embedded]" in result.stderr
    assert "Traceback" not in result.stderr
