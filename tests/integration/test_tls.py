"""TLS on both ports with a CA made here (cryptography): tritonclient over gRPC and HTTPS,
the admin CLI with --cacert, mutual TLS refusing a client without a valid certificate, and
a certificate replaced on disk served at the next handshake without a restart."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from certificates import certificate, new_key, write_pem
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import EVENTUALLY_S, GatewayThread, local_settings, running

TOKEN = "s" * 24


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate


def issue(
    pki_dir: Path, stem: str, common: str, ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate, server: bool,
) -> tuple[Path, Path]:  # fmt: skip
    key = new_key()
    hosts = ("localhost", "127.0.0.1") if server else ()
    cert = certificate(common, key, issuer=ca_cert, issuer_key=ca_key, hosts=hosts)
    return write_pem(pki_dir, stem, cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = new_key()
    ca_cert = certificate("turnout test CA", ca_key, ca=True)
    ca = folder / "ca.pem"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = issue(folder, "server", "localhost", ca_key, ca_cert, server=True)
    client_cert, client_key = issue(folder, "client", "app", ca_key, ca_cert, server=False)
    return Pki(ca, cert, key, client_cert, client_key, ca_key, ca_cert)


def inputs(module: object) -> list[object]:
    a = np.ones((1, 4), np.float32)
    tensors = []
    for name in ("a", "b"):
        tensor = module.InferInput(name, [1, 4], "FP32")  # type: ignore[attr-defined]
        tensor.set_data_from_numpy(a)
        tensors.append(tensor)
    return tensors


def served_serial(address: str, ca: Path) -> int:
    host, port = address.split(":")
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2", "http/1.1"])  # gRPC's listeners want h2
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def tls_gateway(repository: Path, pki: Pki, tmp_path: Path) -> Iterator[GatewayThread]:
    # Copies: the reload test replaces them.
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki.cert.read_bytes())
    key.write_bytes(pki.key.read_bytes())
    settings = local_settings(
        repository, tls_cert_file=cert, tls_key_file=key,
        admin_tokens=[{"name": "ops", "token": TOKEN, "role": "admin"}],
    )  # fmt: skip
    with running(settings) as gateway:
        yield gateway


def test_tritonclient_over_tls_on_both_protocols(tls_gateway: GatewayThread, pki: Pki) -> None:
    grpc_client = grpcclient.InferenceServerClient(
        tls_gateway.grpc_url, ssl=True, root_certificates=str(pki.ca)
    )
    answer = grpc_client.infer("add_sub", inputs(grpcclient))
    np.testing.assert_array_equal(answer.as_numpy("sum"), np.full((1, 4), 2, np.float32))
    http_client = httpclient.InferenceServerClient(
        tls_gateway.http_url,
        ssl=True,
        ssl_context_factory=lambda: ssl.create_default_context(cafile=str(pki.ca)),
    )
    answer = http_client.infer("add_sub", inputs(httpclient))
    np.testing.assert_array_equal(answer.as_numpy("diff"), np.zeros((1, 4), np.float32))
    assert tls_gateway.gateway.scheme == "https"


def test_plain_clients_and_unknown_cas_are_refused(tls_gateway: GatewayThread) -> None:
    client = grpcclient.InferenceServerClient(tls_gateway.grpc_url)
    with pytest.raises(Exception):  # noqa: B017 - the handshake fails, whatever grpc calls it
        client.infer("add_sub", inputs(grpcclient), client_timeout=5)
    host, port = tls_gateway.http_url.split(":")
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection((host, int(port)), timeout=10) as raw,
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_the_cli_takes_cacert(tls_gateway: GatewayThread, pki: Pki) -> None:
    command = [
        sys.executable, "-m", "turnout.cli", "traffic", "status", "add_sub", "--json",
        "--url", f"https://{tls_gateway.http_url}", "--token", TOKEN,
    ]  # fmt: skip
    trusted = subprocess.run(
        [*command, "--cacert", str(pki.ca)], capture_output=True, text=True, timeout=60
    )
    assert trusted.returncode == 0, trusted.stderr
    untrusted = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_a_replaced_certificate_is_served_without_a_restart(
    tls_gateway: GatewayThread, pki: Pki, tmp_path: Path
) -> None:
    before = served_serial(tls_gateway.http_url, pki.ca)
    new_cert, new_key = issue(tmp_path, "renewed", "localhost", pki.ca_key, pki.ca_cert, True)
    certificates = tls_gateway.gateway.certificates
    assert certificates is not None
    certificates.files.key.write_bytes(new_key.read_bytes())
    certificates.files.cert.write_bytes(new_cert.read_bytes())
    deadline = time.monotonic() + EVENTUALLY_S
    while certificates.reloads == 0:
        assert time.monotonic() < deadline, "the certificate was never reloaded"
        time.sleep(0.1)
    expected = x509.load_pem_x509_certificate(new_cert.read_bytes()).serial_number
    assert served_serial(tls_gateway.http_url, pki.ca) == expected != before
    # A connection each: every one of the gRPC servers sharing the port serves the new one.
    grpc_serials = {served_serial(tls_gateway.grpc_url, pki.ca) for _ in range(24)}
    assert grpc_serials == {expected}
    grpc_client = grpcclient.InferenceServerClient(
        tls_gateway.grpc_url, ssl=True, root_certificates=str(pki.ca)
    )
    assert grpc_client.is_server_live()


def test_mutual_tls_refuses_a_client_without_a_certificate(repository: Path, pki: Pki) -> None:
    settings = local_settings(
        repository, tls_cert_file=pki.cert, tls_key_file=pki.key, tls_client_ca_file=pki.ca
    )
    with running(settings) as gateway:
        with_cert = grpcclient.InferenceServerClient(
            gateway.grpc_url, ssl=True, root_certificates=str(pki.ca),
            private_key=str(pki.client_key), certificate_chain=str(pki.client_cert),
        )  # fmt: skip
        assert with_cert.is_server_live()
        without = grpcclient.InferenceServerClient(
            gateway.grpc_url, ssl=True, root_certificates=str(pki.ca)
        )
        with pytest.raises(Exception):  # noqa: B017 - refused at the handshake
            without.is_server_live(client_timeout=5)
        host, port = gateway.http_url.split(":")
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(pki.client_cert, pki.client_key)
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            assert b"200 OK" in tls.recv(4096)
        bare = ssl.create_default_context(cafile=str(pki.ca))
        with (
            pytest.raises((ssl.SSLError, ConnectionError, OSError)),
            socket.create_connection((host, int(port)), timeout=10) as raw,
            bare.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            if not tls.recv(4096):
                raise ConnectionError("closed without an answer")
