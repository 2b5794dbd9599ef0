"""Service-to-service security: TLS, mutual TLS, bearer tokens and the audit trail."""

import datetime as dt
import ipaddress
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tally_client import PermissionDenied, TallyClient, Unauthenticated, Unavailable
from tally_service.auth import hash_token
from tests.conftest import ServerProcess, start_server
from tests.support import assert_consistent


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate."""
    out = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("tally-test-ca", ca_key, None, ca_key, ca=True)
    files: dict[str, Path] = {}
    for name, cert, key in [
        ("ca", ca, ca_key),
        *[
            (who, _cert(f"tally-{who}", k, ca, ca_key, server=who == "server"), k)
            for who, k in (("server", _key()), ("client", _key()))
        ],
    ]:
        files[f"{name}.crt"] = out / f"{name}.crt"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"] = out / f"{name}.key"
        files[f"{name}.key"].write_bytes(_pem_key(key))
    return files


def _tls(pki: dict[str, Path], with_client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca.crt"].read_bytes(),
        private_key=pki["client.key"].read_bytes() if with_client_cert else None,
        certificate_chain=pki["client.crt"].read_bytes() if with_client_cert else None,
    )


ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
REPORTER_TOKEN = "reporter-" + uuid.uuid4().hex
CALLERS = [
    {"name": "billing-admin", "sha256": hash_token(ADMIN_TOKEN), "methods": ["*"]},
    {
        "name": "image-api",
        "sha256": hash_token(REPORTER_TOKEN),
        "methods": [
            "tally.v1.MeteringService/RecordUsage*",
            "tally.v1.CreditsService/Reserve",
            "tally.v1.CreditsService/Capture",
            "tally.v1.CreditsService/GetBalance",
        ],
    },
]


@pytest.fixture(scope="module")
def secured(
    database_url: str, server_log_dir: Path, pki: dict[str, Path]
) -> Iterator[ServerProcess]:
    env = {
        "TALLY_TLS_CERT_FILE": str(pki["server.crt"]),
        "TALLY_TLS_KEY_FILE": str(pki["server.key"]),
        "TALLY_TLS_CLIENT_CA_FILE": str(pki["ca.crt"]),
        "TALLY_AUTH_TOKENS": json.dumps(CALLERS),
    }
    # conftest's readiness probe speaks plaintext; this server only speaks mTLS, so it
    # is started directly and probed over TLS.
    process = start_server(database_url, server_log_dir, env, credentials=_tls(pki, True))
    yield process
    process.stop()


def client(server: ServerProcess, pki: dict[str, Path], token: str | None) -> TallyClient:
    return TallyClient(
        server.target,
        channel_credentials=_tls(pki, True),
        metadata=[("authorization", f"Bearer {token}")] if token else None,
        max_attempts=1,
    )


def test_tokens_decide_who_may_call_what(secured: ServerProcess, pki: dict[str, Path]) -> None:
    account_id = f"sec-{uuid.uuid4().hex[:8]}"
    with client(secured, pki, ADMIN_TOKEN) as admin:
        admin.create_account(account_id)
        admin.top_up(account_id, "10")
        admin.upsert_product(f"img-{account_id}", "1")
    with client(secured, pki, REPORTER_TOKEN) as reporter:
        recorded = reporter.record_usage(account_id, "evt-1", f"img-{account_id}")
        hold = reporter.reserve(account_id, "2")
        reporter.capture(hold.reservation_id)
        with pytest.raises(PermissionDenied) as denied:
            reporter.top_up(account_id, "1000")
        assert denied.value.metadata["caller"] == "image-api"
        with pytest.raises(PermissionDenied):
            reporter.adjust(account_id, "5", "please")
        assert reporter.get_balance(account_id).balance == "7"
    for token in (None, "wrong-token"):
        with client(secured, pki, token) as stranger, pytest.raises(Unauthenticated):
            stranger.get_balance(account_id)
    with client(secured, pki, ADMIN_TOKEN) as admin:
        entries = {e.description: e for e in admin.iter_entries(account_id)}
        # The audit trail: each entry names the caller that wrote it.
        assert entries[""].metadata["caller"] == "billing-admin"  # the top-up
        assert recorded.entry.entry_id in {e.entry_id for e in entries.values()}
        usage = admin.get_entry(recorded.entry.entry_id)
        assert usage.metadata["caller"] == "image-api"
        assert_consistent(admin, account_id)


def test_mutual_tls_is_required(secured: ServerProcess, pki: dict[str, Path]) -> None:
    with (
        TallyClient(
            secured.target, channel_credentials=_tls(pki, False), max_attempts=1, timeout_seconds=3
        ) as no_cert,
        pytest.raises(Unavailable),
    ):
        no_cert.get_balance("anyone")
    with (
        TallyClient(secured.target, max_attempts=1, timeout_seconds=3) as plaintext,
        pytest.raises(Unavailable),
    ):
        plaintext.get_balance("anyone")


def test_health_needs_no_token(secured: ServerProcess, pki: dict[str, Path]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.secure_channel(secured.target, _tls(pki, True)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_hash_token_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tally_service", "hash-token"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == hash_token("s3cret")
