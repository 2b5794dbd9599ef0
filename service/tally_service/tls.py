"""Server transport security: TLS, or mutual TLS when a client CA is given."""

import os
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str  # empty: clients are not asked for certificates

    @classmethod
    def from_env(cls) -> "TlsFiles | None":
        cert = os.environ.get("TALLY_TLS_CERT_FILE", "")
        key = os.environ.get("TALLY_TLS_KEY_FILE", "")
        if not cert and not key:
            return None
        if not (cert and key):
            raise SystemExit("TLS needs both TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE")
        return cls(cert, key, os.environ.get("TALLY_TLS_CLIENT_CA_FILE", ""))

    def credentials(self) -> grpc.ServerCredentials:
        with open(self.cert_file, "rb") as f:
            cert = f.read()
        with open(self.key_file, "rb") as f:
            key = f.read()
        client_ca = None
        if self.client_ca_file:
            with open(self.client_ca_file, "rb") as f:
                client_ca = f.read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
