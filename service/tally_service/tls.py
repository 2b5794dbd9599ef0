"""Server transport security: TLS, or mutual TLS when a client CA is given."""

from dataclasses import dataclass

import grpc

from tally_service.config import Settings


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str  # empty: clients are not asked for certificates

    @classmethod
    def from_settings(cls, settings: Settings) -> "TlsFiles | None":
        """The files of TALLY_TLS_* (checked by Settings.from_env); None: no TLS."""
        if not settings.tls_cert_file:
            return None
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)

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
