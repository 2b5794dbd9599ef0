"""Code for other languages (scripts/check-codegen, which scripts/test runs first): the
descriptor set names every service, and the TypeScript example client, compiled from the
code `buf generate` wrote, calls the real server over gRPC."""

import json
import shutil
import subprocess
import uuid

import pytest
from google.protobuf import descriptor_pb2

from tests.conftest import ROOT, ServerProcess

DESCRIPTOR_SET = ROOT / "build" / "protos" / "tally.binpb"
EXAMPLE = ROOT / "clients" / "node" / "dist" / "example.js"


def test_descriptor_set() -> None:
    if not DESCRIPTOR_SET.exists():
        pytest.skip("no build/protos/tally.binpb: run scripts/check-codegen")
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert {
        "tally.v1.AccountsService",
        "tally.v1.CreditsService",
        "tally.v1.LedgerService",
        "tally.v1.MeteringService",
        "tally.v1.FundingService",
    } <= services
    # Self-contained: the imports are in the set too.
    names = {f.name for f in files}
    assert {
        "google/rpc/status.proto",
        "google/api/field_behavior.proto",
        "google/protobuf/timestamp.proto",
    } <= names


def test_typescript_client_calls_the_server(server: ServerProcess) -> None:
    node = shutil.which("node")
    if node is None or not EXAMPLE.exists():
        pytest.skip("no node or no clients/node/dist: run scripts/check-codegen")
    account = f"ts-{uuid.uuid4().hex[:12]}"
    result = subprocess.run(
        [node, str(EXAMPLE), server.target, account],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    balance = json.loads(result.stdout)["balance"]
    assert balance["accountId"] == account
    assert balance["available"] == "5"
