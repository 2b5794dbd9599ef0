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

from tally_client import NotFound, PermissionDenied, TallyClient, Unauthenticated, Unavailable
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


# -- rotation without a restart -----------------------------------------------------------


def _presented_certificate(target: str, ca: Path) -> x509.Certificate:
    """The certificate the server presents to a new TLS connection."""
    import socket
    import ssl

    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _replace(path: Path, data: bytes) -> None:
    """Writes the file as a new inode, the way a Secret volume's update appears."""
    fresh = path.with_suffix(".new")
    fresh.write_bytes(data)
    fresh.replace(path)


def test_a_rotated_certificate_is_served_to_new_connections(
    database_url: str, server_log_dir: Path, pki: dict[str, Path], tmp_path: Path
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import free_port

    ca_key = serialization.load_pem_private_key(pki["ca.key"].read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(pki["ca.crt"].read_bytes())
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(pki["server.crt"].read_bytes())
    key_file.write_bytes(pki["server.key"].read_bytes())
    health_address = f"127.0.0.1:{free_port()}"
    env = {
        "TALLY_TLS_CERT_FILE": str(cert_file),
        "TALLY_TLS_KEY_FILE": str(key_file),
        "TALLY_HEALTH_ADDRESS": health_address,
    }
    server = start_server(database_url, server_log_dir, env, credentials=_tls(pki, False))
    try:
        first = _presented_certificate(server.target, pki["ca.crt"])
        assert first.subject.rfc4514_string() == "CN=tally-server"
        renewed_key = _key()
        renewed = _cert("tally-server-renewed", renewed_key, ca, ca_key, server=True)
        _replace(key_file, _pem_key(renewed_key))
        _replace(cert_file, renewed.public_bytes(serialization.Encoding.PEM))
        presented = _presented_certificate(server.target, pki["ca.crt"])
        assert presented.subject.rfc4514_string() == "CN=tally-server-renewed"
        with TallyClient(
            server.target, channel_credentials=_tls(pki, False), max_attempts=1
        ) as client:
            client.create_account(f"rotated-{uuid.uuid4().hex[:8]}")
        # Health in plaintext on its own port, for Kubernetes' native gRPC probes.
        with grpc.insecure_channel(health_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
    assert "TLS certificate files changed: reloaded" in server.log()


def test_a_changed_token_file_is_followed(
    database_url: str, server_log_dir: Path, tmp_path: Path
) -> None:
    import time

    tokens = tmp_path / "callers.json"
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    tokens.write_text(json.dumps([{"name": "old", "sha256": hash_token(old), "methods": ["*"]}]))
    server = start_server(database_url, server_log_dir, {"TALLY_AUTH_TOKENS_FILE": str(tokens)})

    def balance(token: str) -> None:
        metadata = [("authorization", f"Bearer {token}")]
        with TallyClient(server.target, metadata=metadata, max_attempts=1) as c:
            c.get_balance("nobody-at-all")

    try:
        with pytest.raises(NotFound):
            balance(old)  # authenticated (the account does not exist)
        with pytest.raises(Unauthenticated):
            balance(new)
        _replace(
            tokens,
            json.dumps([{"name": "new", "sha256": hash_token(new), "methods": ["*"]}]).encode(),
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                balance(new)
            except NotFound:
                break
            except Unauthenticated:
                assert time.monotonic() < deadline, "the new token was never accepted"
                time.sleep(0.2)
        with pytest.raises(Unauthenticated):
            balance(old)
        # A broken file is skipped: the callers before it stay.
        tokens.write_text("[{not json")
        time.sleep(1.5)
        with pytest.raises(NotFound):
            balance(new)
    finally:
        server.stop()
    assert "TALLY_AUTH_TOKENS_FILE changed: reloaded" in server.log()
