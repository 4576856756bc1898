"""The local CA, the server certificate, and the TLS contexts built on them."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from p2ppay.pki import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, ensure_server_credentials
from p2ppay.tls import MissingCA, client_context, server_context


async def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str
) -> bool:
    """True if a TLS handshake between the two contexts succeeds (in memory)."""
    a, b = trio.testing.memory_stream_pair()
    client = trio.SSLStream(a, client_ctx, server_hostname=server_hostname)
    server = trio.SSLStream(b, server_ctx, server_side=True)

    async def serve() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            await client.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(client)
            return False
    return True


def sans_of(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


def test_first_start_creates_a_ca_and_a_server_certificate(tmp_path: Path) -> None:
    state = tmp_path / "state"
    creds = ensure_server_credentials(state, ("pay.example.org", "192.0.2.7"))
    for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY):
        assert (state / name).is_file()
    for secret in (CA_KEY, SERVER_KEY):
        assert stat.S_IMODE((state / secret).stat().st_mode) == 0o600
    assert {"localhost", "127.0.0.1", "::1", "pay.example.org", "192.0.2.7"} <= sans_of(
        creds.cert_chain
    )
    chain = x509.load_pem_x509_certificates(creds.cert_chain.read_bytes())
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    assert chain[0].issuer == ca.subject
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_restart_keeps_the_ca_and_adds_new_names(tmp_path: Path) -> None:
    first = ensure_server_credentials(tmp_path)
    ca_before = first.ca_cert.read_bytes()
    cert_before = first.cert_chain.read_bytes()
    again = ensure_server_credentials(tmp_path)
    assert again.cert_chain.read_bytes() == cert_before  # nothing to renew
    more = ensure_server_credentials(tmp_path, ("new.example.org",))
    assert more.ca_cert.read_bytes() == ca_before  # clients keep trusting the same CA
    assert "new.example.org" in sans_of(more.cert_chain)


def test_client_without_a_ca_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingCA, match="--cafile"):
        client_context(tmp_path / "nope.pem")


async def test_generated_certificates_work_for_tls(tmp_path: Path) -> None:
    creds = ensure_server_credentials(tmp_path)
    server_ctx = server_context(creds.cert_chain, creds.key)
    client_ctx = client_context(creds.ca_cert)
    assert client_ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client_ctx.verify_mode is ssl.CERT_REQUIRED

    with trio.fail_after(5):
        assert await handshake(client_ctx, server_ctx, "localhost")
        assert await handshake(client_ctx, server_ctx, "127.0.0.1")
        # a name the certificate lacks
        assert not await handshake(client_ctx, server_ctx, "elsewhere.example.org")


async def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    ours = ensure_server_credentials(tmp_path / "ours")
    theirs = ensure_server_credentials(tmp_path / "theirs")
    client_ctx = client_context(ours.ca_cert)
    with trio.fail_after(5):
        assert await handshake(client_ctx, server_context(ours.cert_chain, ours.key), "localhost")
        assert not await handshake(
            client_ctx, server_context(theirs.cert_chain, theirs.key), "localhost"
        )
