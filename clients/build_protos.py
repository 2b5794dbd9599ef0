"""Generates the ``tally.v1`` Python package from the protos (messages, gRPC stubs, type stubs).

One generator for every way the client is built: ``scripts/gen-protos`` runs it for the
development tree, and ``clients/setup.py`` runs it when a wheel of the client distribution is
built, so the wheel always holds ``tally/v1`` (nothing generated is committed). It also copies
``tally/v1/service_config.json`` (the gRPC retry policy) next to the generated code, where the
client loads it as package data.

Needs ``grpcio-tools`` and ``mypy-protobuf`` (build requirements of the client distribution).

    python clients/build_protos.py [OUT_DIR]      (default: the folder of this file)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def proto_root() -> Path:
    """The folder holding ``tally/v1/*.proto``: ``protos/`` beside this file in an sdist,
    else the repository's ``protos/``."""
    for candidate in (HERE / "protos", HERE.parent / "protos"):
        if (candidate / "tally" / "v1").is_dir():
            return candidate
    raise FileNotFoundError(f"no protos/tally/v1 next to or above {HERE}")


def generate(out: Path = HERE) -> None:
    """Writes ``out/tally/__init__.py`` and ``out/tally/v1/`` afresh."""
    protos = proto_root()
    sources = sorted(str(p.relative_to(protos)) for p in (protos / "tally" / "v1").glob("*.proto"))
    package = out / "tally"
    shutil.rmtree(package, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    plugins = Path(sys.executable).parent
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{protos}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
    ]
    # mypy-protobuf's plugins are console scripts next to this interpreter (a venv, or an
    # isolated build environment whose bin/ may not be on PATH).
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        plugin = shutil.which(name, path=str(plugins)) or shutil.which(name)
        if plugin:
            command.append(f"--plugin={name}={plugin}")
    result = subprocess.run([*command, *sources], cwd=protos, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise subprocess.CalledProcessError(result.returncode, command)
    # Regular packages (not namespace packages) so mypy and setuptools find them.
    for init in (package / "__init__.py", package / "v1" / "__init__.py"):
        init.touch()
    (package / "v1" / "py.typed").touch()
    shutil.copyfile(
        protos / "tally" / "v1" / "service_config.json", package / "v1" / "service_config.json"
    )


def runtime_requirements(out: Path = HERE) -> list[str]:
    """The least grpcio and protobuf the generated code in ``out`` runs with.

    Generated code checks at import that the runtime is at least as new as the generator
    (``ValidateProtobufRuntimeVersion``, ``GRPC_GENERATED_VERSION``), so the wheel's
    dependencies follow the generator it was built with.
    """
    v1 = out / "tally" / "v1"
    pb = (v1 / "credits_pb2.py").read_text(encoding="utf-8")
    grpc = (v1 / "credits_pb2_grpc.py").read_text(encoding="utf-8")
    protobuf = re.search(r"^# Protobuf Python Version: (\S+)$", pb, re.MULTILINE)
    grpcio = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", grpc, re.MULTILINE)
    requirements = []
    if grpcio:
        requirements.append(f"grpcio>={grpcio.group(1)}")
    if protobuf:
        major = int(protobuf.group(1).split(".")[0])
        # The runtime may be one major version ahead of the generated code, not more.
        requirements.append(f"protobuf>={protobuf.group(1)},<{major + 2}")
    return requirements


if __name__ == "__main__":
    generate(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE)
