"""Encryption in transit, against real `tally serve` processes with trustme certificates.

The server speaks HTTPS only, TLS 1.2 and 1.3 with Mozilla's intermediate ciphers, sends HSTS,
and with --tls-client-ca requires a client certificate. Refusals are proved with a control: the
same client against a deliberately permissive TLS server does connect, so it is Tally that
refuses, not the client that could not even try. The PostgreSQL half: a URL with
`sslmode=verify-full` is honoured, down to the migrations.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
import pytest
import trustme

from tally.crypto import keyring as keyrings
from tally.store import migrate
from tally.store.postgres import libpq_url
from tests.conftest import IN_CI
from tests.support.pgcluster import Cluster, throwaway_cluster
from tests.support.server import TALLY, Server, running_server

HSTS = "max-age=63072000"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
# What an old or careless client may offer; none is in Mozilla's intermediate list. RSA key
# exchange (no forward secrecy), CBC with SHA-1, and CBC with SHA-256: the last one is in
# Python's own default server list, so only Tally's explicit list refuses it.
WEAK_CIPHERS = [
    "AES128-SHA",
    "AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA256",
]


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: trustme.CA
    server: trustme.LeafCert
    client_ca: trustme.CA  # signs the billing systems' client certificates
    client: trustme.LeafCert
    stranger: trustme.LeafCert  # a client certificate from a CA Tally does not trust

    def path(self, name: str) -> Path:
        return self.folder / name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    # RSA, so that the RSA-key-exchange ciphers in WEAK_CIPHERS could be negotiated at all.
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.RSA)
    client_ca = trustme.CA()
    client = client_ca.issue_cert("billing@example.com")
    stranger = trustme.CA().issue_cert("billing@example.com")
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    client_ca.cert_pem.write_to_path(str(folder / "client-ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(folder / "other-ca.pem"))
    return Pki(folder, ca, server, client_ca, client, stranger)


def client_context(
    pki: Pki,
    *,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    cert: trustme.LeafCert | None = None,
) -> ssl.SSLContext:
    """A client that trusts the test CA, optionally pinned to one protocol version."""
    context = ssl.create_default_context()
    pki.ca.configure_trust(context)
    with warnings.catch_warnings():  # pinning TLS 1.0 or 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        if version is not None:
            context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if cert is not None:
        cert.configure_cert(context)
    return context


def exchange(port: int, context: ssl.SSLContext, request: bytes = HEALTHZ) -> tuple[str, bytes]:
    """(negotiated protocol, everything answered) for one request on a new connection.

    Raises ssl.SSLError or ConnectionError when the handshake (or the connection) is refused.
    """
    with (
        socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        negotiated = str(tls.version())
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return negotiated, answer


def answered(port: int, context: ssl.SSLContext) -> bool:
    """Whether the server answered a request over this client's TLS connection at all.

    With TLS 1.3 the client's side of the handshake ends before the server has judged its
    certificate, so a refusal may come only as an alert or a close after the request.
    """
    try:
        _, answer = exchange(port, context)
    except (ssl.SSLError, ConnectionError):
        return False
    return answer.startswith(b"HTTP/")


@contextlib.contextmanager
def permissive_tls_server(pki: Pki) -> Iterator[int]:
    """The control: a TLS server that accepts TLS 1.0 and every cipher; answers 200 once."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("ALL:@SECLEVEL=0")
    pki.server.configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_once() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=15)


def serve(
    pki: Pki, tmp: Path, *options: str, tls: ssl.SSLContext
) -> contextlib.AbstractContextManager[Server]:
    """`tally serve` over a new SQLite store with the test certificate and `options`."""
    return running_server(
        f"sqlite:///{tmp / 'tally.db'}",
        tmp,
        "--tls-cert",
        str(pki.path("server.pem")),
        "--tls-key",
        str(pki.path("server.key")),
        *options,
        tls=tls,
    )


@pytest.fixture(scope="module")
def https_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two workers: each loads the TLS configuration in its own process."""
    with serve(
        pki, tmp_path_factory.mktemp("https"), "--workers", "2", tls=client_context(pki)
    ) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    client_ca = str(pki.path("client-ca.pem"))
    ready = client_context(pki, cert=pki.client)
    with serve(
        pki, tmp_path_factory.mktemp("mtls"), "--tls-client-ca", client_ca, tls=ready
    ) as server:
        yield server


# --- protocol versions ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_handshakes_succeed_on_every_worker(
    https_server: Server, pki: Pki, version: ssl.TLSVersion
) -> None:
    # Several connections, so that both worker processes are likely to take some. That each
    # built its TLS context is proved already by the server being up: uvicorn stops the
    # whole server when a worker fails to start.
    for _ in range(8):
        negotiated, answer = exchange(https_server.port, client_context(pki, version=version))
        assert (
            negotiated
            == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        )
        assert answer.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(("flag", "protocol"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_openssl_s_client_connects_with_tls_1_2_and_1_3(
    https_server: Server, pki: Pki, flag: str, protocol: str
) -> None:
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{https_server.port}",
            flag,
            "-CAfile",
            str(pki.path("ca.pem")),
            "-verify_return_error",
            "-ign_eof",
        ],
        input=HEALTHZ,
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, output + done.stderr.decode(errors="replace")
    assert f"New, {protocol}, Cipher is " in output
    assert "Verify return code: 0 (ok)" in output
    assert "HTTP/1.1 200 OK" in output


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1])
def test_tls_1_1_and_1_0_are_refused_by_the_server(
    https_server: Server, pki: Pki, version: ssl.TLSVersion
) -> None:
    # The local OpenSSL refuses these versions at its default security level on the client
    # side too; level 0 lets the client offer them, and the control shows that it can.
    old_client = client_context(pki, version=version, ciphers="ALL:@SECLEVEL=0")
    with permissive_tls_server(pki) as control:
        negotiated, answer = exchange(control, old_client)
    assert negotiated == {ssl.TLSVersion.TLSv1_1: "TLSv1.1", ssl.TLSVersion.TLSv1: "TLSv1"}[version]
    assert answer.startswith(b"HTTP/1.1 200 ")

    with pytest.raises((ssl.SSLError, ConnectionError)):
        exchange(https_server.port, old_client)


@pytest.mark.parametrize("cipher", WEAK_CIPHERS)
def test_ciphers_outside_mozilla_intermediate_are_refused(
    https_server: Server, pki: Pki, cipher: str
) -> None:
    weak_client = client_context(
        pki, version=ssl.TLSVersion.TLSv1_2, ciphers=f"{cipher}:@SECLEVEL=0"
    )
    with permissive_tls_server(pki) as control:
        negotiated, _ = exchange(control, weak_client)
    assert negotiated == "TLSv1.2"

    with pytest.raises((ssl.SSLError, ConnectionError)):
        exchange(https_server.port, weak_client)


def test_an_intermediate_cipher_is_accepted(https_server: Server, pki: Pki) -> None:
    client = client_context(
        pki, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256"
    )
    _, answer = exchange(https_server.port, client)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_plain_http_to_the_tls_port_gets_no_http_answer(https_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", https_server.port), timeout=15) as raw:
        raw.sendall(HEALTHZ)
        answer = b""
        with contextlib.suppress(ConnectionError):
            while chunk := raw.recv(65536):
                answer += chunk
    assert b"HTTP/" not in answer
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{https_server.port}/healthz", timeout=15)


# --- HSTS ---------------------------------------------------------------------------------------


def test_every_https_response_carries_hsts(https_server: Server) -> None:
    with https_server.client(timeout=15) as client:
        answers = [
            client.get("/healthz"),
            client.get("/v1/events"),  # 401: no key
            client.get("/v1/nowhere"),  # 404
            client.get(
                "/v1/tenants", headers={"Authorization": f"Bearer {https_server.admin_key}"}
            ),
        ]
    assert [a.status_code for a in answers] == [200, 401, 404, 200]
    assert all(a.headers["strict-transport-security"] == HSTS for a in answers)


def test_plain_http_responses_carry_no_hsts(tally_server: Server) -> None:
    answer = httpx.get(f"{tally_server.base_url}/healthz", timeout=15)
    assert answer.status_code == 200
    assert "strict-transport-security" not in answer.headers


def test_no_response_names_the_server_software(tally_server: Server) -> None:
    """No `server: uvicorn`: what runs behind the port is not the client's to know (and not
    a version for a scanner to match), on answers and on the edge's own refusals alike."""
    with httpx.Client(base_url=tally_server.base_url, timeout=15) as client:
        answers = [
            client.get("/healthz"),
            client.get("/v1/events"),  # 401: no key
            client.get("/v1/nowhere"),  # 404
            client.get("/healthz", headers={"x-big": "x" * 70_000}),  # the edge's 431
        ]
    assert [a.status_code for a in answers] == [200, 401, 404, 431]
    assert all("server" not in a.headers for a in answers)


# --- mutual TLS -------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server: Server, pki: Pki) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assert not answered(mtls_server.port, client_context(pki, version=version)), version
    with (
        pytest.raises(httpx.TransportError),
        httpx.Client(verify=client_context(pki), timeout=15) as client,
    ):
        client.get(f"{mtls_server.base_url}/healthz")


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_server: Server, pki: Pki) -> None:
    stranger = client_context(pki, cert=pki.stranger)
    with pytest.raises(httpx.TransportError), httpx.Client(verify=stranger, timeout=15) as client:
        client.get(f"{mtls_server.base_url}/healthz")


def test_mutual_tls_serves_a_client_with_a_valid_certificate(mtls_server: Server) -> None:
    admin = {"Authorization": f"Bearer {mtls_server.admin_key}"}
    with mtls_server.client(timeout=15) as client:
        created = client.post("/v1/tenants", json={"id": "acme"}, headers=admin)
        listed = client.get("/v1/tenants", headers=admin)
    assert created.status_code == 201, created.text
    assert [t["id"] for t in listed.json()] == ["acme"]
    assert listed.headers["strict-transport-security"] == HSTS


# --- start-up refusals ------------------------------------------------------------------------


def tally_serve(tmp: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`tally serve` expected to refuse to start: it must exit by itself."""
    environment = {"TALLY_DATABASE_URL": f"sqlite:///{tmp / 'tally.db'}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [str(TALLY), "serve", "--port", "1", *options],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp,
    )


@pytest.mark.parametrize(
    ("options", "code", "says"),
    [
        (["--tls-cert", "server.pem"], 2, "TALLY_TLS_KEY (--tls-key)"),
        (["--tls-key", "server.key"], 2, "TALLY_TLS_CERT (--tls-cert)"),
        (["--tls-cert", "server.pem", "--tls-key", "missing.key"], 2, "cannot read"),
        (["--tls-client-ca", "client-ca.pem"], 2, "set TALLY_TLS_CERT and TALLY_TLS_KEY"),
        # The key of another certificate, and a CA file that holds no certificate.
        (["--tls-cert", "server.pem", "--tls-key", "other.key"], 1, "its private key"),
        (
            [
                "--tls-cert",
                "server.pem",
                "--tls-key",
                "server.key",
                "--tls-client-ca",
                "server.key",
            ],
            1,
            "TALLY_TLS_CLIENT_CA",
        ),
    ],
)
def test_serve_refuses_unusable_tls_settings_at_start_up(
    pki: Pki, tmp_path: Path, options: list[str], code: int, says: str
) -> None:
    for name in ("server.pem", "server.key", "client-ca.pem"):
        (tmp_path / name).write_bytes(pki.path(name).read_bytes())
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(tmp_path / "other.key"))

    done = tally_serve(tmp_path, *options)

    assert done.returncode == code, done.stdout + done.stderr
    assert says in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "tally.db").exists()  # refused before touching the store


def test_tls_settings_come_from_the_environment_too(pki: Pki, tmp_path: Path) -> None:
    environment = {
        "TALLY_TLS_CERT": str(pki.path("server.pem")),
        "TALLY_TLS_KEY": str(pki.path("server.key")),
    }
    with (
        running_server(
            f"sqlite:///{tmp_path / 'tally.db'}", tmp_path, env=environment, tls=client_context(pki)
        ) as server,
        server.client(timeout=15) as client,
    ):
        answer = client.get("/healthz")
    assert answer.headers["strict-transport-security"] == HSTS


# --- PostgreSQL with sslmode=verify-full --------------------------------------------------------


@pytest.fixture
def tls_cluster(pki: Pki) -> Iterator[Cluster]:
    tls = (pki.server.cert_chain_pems[0].bytes(), pki.server.private_key_pem.bytes())
    try:
        with throwaway_cluster(tls=tls) as started:
            yield started
    except FileNotFoundError as missing:  # no PostgreSQL server programs on this machine
        if IN_CI:
            raise
        pytest.skip(f"PostgreSQL server programs are not installed: {missing}")


def verify_full(cluster: Cluster, ca: Path) -> str:
    return f"{cluster.url}?sslmode=verify-full&sslrootcert={quote(str(ca))}"


def test_postgres_verify_full_is_honoured(tls_cluster: Cluster, pki: Pki, tmp_path: Path) -> None:
    url = verify_full(tls_cluster, pki.path("ca.pem"))

    with running_server(url, tmp_path) as server:
        admin = {"Authorization": f"Bearer {server.admin_key}"}
        with server.client(timeout=15) as client:
            created = client.post("/v1/tenants", json={"id": "acme"}, headers=admin)
        with psycopg.connect(tls_cluster.url) as connection:
            tally_connections = connection.execute(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                " WHERE a.application_name = 'tally'"
            ).fetchall()

    assert created.status_code == 201, created.text
    assert tally_connections
    assert all(ssl_on for (ssl_on,) in tally_connections)


def test_postgres_with_a_certificate_from_another_ca_refuses_to_start(
    tls_cluster: Cluster, pki: Pki, tmp_path: Path
) -> None:
    url = verify_full(tls_cluster, pki.path("other-ca.pem"))
    keyring = tmp_path / "tally.keyring"  # checked first: without it, that is the message
    keyrings.generate(keyring)

    done = subprocess.run(
        [str(TALLY), "serve", "--port", "1"],
        env={"TALLY_DATABASE_URL": url, "TALLY_KEYRING": str(keyring), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot be reached" in done.stderr
    assert "certificate verify failed" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_migrations_keep_the_url_query_and_so_verify_the_server(
    tls_cluster: Cluster, pki: Pki
) -> None:
    # yoyo connects on its own, not through the store's pool: it must see sslmode too.
    wrong = libpq_url(verify_full(tls_cluster, pki.path("other-ca.pem")))
    assert "sslmode=verify-full" in wrong
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        migrate.apply(wrong, "postgresql")
    assert migrate.apply(libpq_url(verify_full(tls_cluster, pki.path("ca.pem"))), "postgresql")
