"""Server transport security: TLS, or mutual TLS when a client CA is given.

The files are read again when they change, with no restart: gRPC asks
``CertificateReloader.fetch`` for the certificate configuration at each new TLS
handshake, and it re-reads the files only when one of them changed (its modification
time, size or inode: a Kubernetes Secret volume swaps a symlink). Connections already
open keep the certificate they were made with. A half-written or mismatched pair is
logged and skipped: the previous configuration stays until a good one is on disk.
"""

import logging
import os
import ssl
import threading
from dataclasses import dataclass

import grpc

from tally_service.config import Settings

log = logging.getLogger(__name__)


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

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        with open(self.cert_file, "rb") as f:
            cert = f.read()
        with open(self.key_file, "rb") as f:
            key = f.read()
        client_ca = None
        if self.client_ca_file:
            with open(self.client_ca_file, "rb") as f:
                client_ca = f.read()
        return cert, key, client_ca

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that follow the files (see CertificateReloader)."""
        return CertificateReloader(self).credentials()


def _signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    signature = []
    for path in paths:
        st = os.stat(path)
        signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(signature)


def _configuration(files: TlsFiles) -> object:
    """The files as a gRPC certificate configuration; OSError (ssl.SSLError included) or
    ValueError when they are not a matching PEM chain and key."""
    cert, key, client_ca = files.read()
    if b"PRIVATE KEY" not in key or b"CERTIFICATE" not in cert:
        raise ValueError("not a PEM certificate chain and private key")
    # The key must belong to the certificate (gRPC would only fail the handshakes).
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        files.cert_file, files.key_file
    )
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)


class CertificateReloader:
    """The certificate configuration of a TLS server, re-read when its files change."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._signature = _signature(files.paths)
        self.initial = _configuration(files)
        self.reloads = 0

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,
            require_client_authentication=bool(self.files.client_ca_file),
        )

    def fetch(self) -> object | None:
        """Called by gRPC before each handshake: a new configuration, or None (unchanged)."""
        with self._lock:
            try:
                signature = _signature(self.files.paths)
                if signature == self._signature:
                    return None
                configuration = _configuration(self.files)
            except (OSError, ValueError) as exc:
                log.warning("TLS files changed but cannot be used yet: %s", exc)
                return None
            self._signature = signature
            self.reloads += 1
            log.info("TLS certificate files changed: reloaded", extra={"files": self.files.paths})
            return configuration
