"""TLS for both ports: server certificates, optional client certificates (mTLS), and
certificates reloaded when their files change, without a restart.

One :class:`Certificates` reads ``tls_cert_file``/``tls_key_file`` (and
``tls_client_ca_file``) and serves both transports: HTTP through an ``ssl.SSLContext`` that
uvicorn's server uses for every handshake (reloading loads the new chain into the same
context), gRPC through a second context offering ``h2`` (the gateway's own transport) or
``grpc.dynamic_ssl_server_credentials`` (grpc.aio), whose fetcher hands grpc the new
configuration at the next handshake. :meth:`Certificates.watch` polls the files'
modification times; a file that fails to load keeps the old certificate (and logs why).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["Certificates", "TlsFiles"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    """Clients must present a certificate signed by this CA (mTLS)."""


def _server_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Certificates:
    def __init__(self, files: TlsFiles, poll_interval_s: float = 2.0) -> None:
        self.files = files
        self.poll_interval_s = poll_interval_s
        self.context = _server_context(files)
        self.grpc_context = _server_context(files)
        """For the gateway's own gRPC transport: HTTP/2 by ALPN (the HTTP port's context
        offers none, so HTTP/1.1 clients are not talked into h2)."""
        self.grpc_context.set_alpn_protocols(["h2"])
        self.reloads = 0
        self._grpc_config: grpc.ServerCertificateConfiguration | None = None
        self._grpc_generation = 0
        """Counts the loads: each credentials object hands grpc a configuration once per
        load (the gateway's several gRPC servers each hold one)."""
        self._stamps = self._mtimes()
        self._load()

    def _paths(self) -> list[Path]:
        return [p for p in (self.files.cert, self.files.key, self.files.client_ca) if p]

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._paths())

    def _load(self) -> None:
        """Load the files into the HTTP context and a new gRPC configuration; raises
        ``ssl.SSLError``/``OSError`` when a file is unreadable or does not match."""
        files = self.files
        for context in (self.context, self.grpc_context):
            context.load_cert_chain(files.cert, files.key)
            if files.client_ca is not None:
                context.load_verify_locations(cafile=files.client_ca)
        client_ca = files.client_ca.read_bytes() if files.client_ca else None
        self._grpc_config = grpc.ssl_server_certificate_configuration(
            [(files.key.read_bytes(), files.cert.read_bytes())], root_certificates=client_ca
        )
        self._grpc_generation += 1

    def reload_if_changed(self) -> bool:
        try:
            stamps = self._mtimes()
        except OSError as exc:
            log.warning("TLS files unreadable, keeping the loaded certificate: %s", exc)
            return False
        if stamps == self._stamps:
            return False
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS files changed but do not load, keeping the old ones: %s", exc)
            return False
        self._stamps = stamps
        self.reloads += 1
        log.info("reloaded the TLS certificate from %s", self.files.cert)
        return True

    async def watch(self) -> None:
        """Reload on change, until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await asyncio.to_thread(self.reload_if_changed)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        assert self._grpc_config is not None
        initial, served = self._grpc_config, self._grpc_generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by grpc at each handshake: a new configuration once after a reload.
            nonlocal served
            if served == self._grpc_generation:
                return None
            served = self._grpc_generation
            return self._grpc_config

        return grpc.dynamic_ssl_server_credentials(
            initial,
            fetch,  # type: ignore[arg-type]  # grpc: None keeps the current configuration
            require_client_authentication=self.files.client_ca is not None,
        )
