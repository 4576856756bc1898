"""The local CA, the server certificate, and the TLS contexts built on them."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import ssl
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from p2ppay.client.peer import PeerKey
from p2ppay.pki import (
    CA_CERT,
    CA_KEY,
    PEER_CA_CERT,
    PEER_CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    IdentityError,
    Issuer,
    ensure_server_credentials,
    state_lock,
)
from p2ppay.receipts import RECEIPT_CERT, ReceiptSigner
from p2ppay.tls import MissingCA, client_context, peer_contexts, server_context


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


HANDSHAKES = 40


async def handshakes(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str | None = None
) -> None:
    """HANDSHAKES connections in memory, each: handshake, a byte each way (a TLS 1.3 client
    reads the server's tickets then), and a clean close from both ends (close_notify: OpenSSL
    drops the session of a connection freed without one, which would hide what is kept)."""
    for _ in range(HANDSHAKES):
        a, b = trio.testing.memory_stream_pair()
        client = trio.SSLStream(a, client_ctx, server_hostname=server_hostname)
        server = trio.SSLStream(b, server_ctx, server_side=True)

        async def serve(server: trio.SSLStream[Any] = server) -> None:
            await server.do_handshake()
            await server.send_all(b"s")
            assert await server.receive_some() == b"c"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.do_handshake()
            assert await client.receive_some() == b"s"
            await client.send_all(b"c")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.aclose)
            await client.aclose()


def kept(*contexts: ssl.SSLContext) -> list[int]:
    """How many TLS sessions each context holds."""
    return [ctx.session_stats()["number"] for ctx in contexts]


def only(ctx: ssl.SSLContext, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_the_server_keeps_no_tls_session_per_handshake(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    # (OP_NO_TICKET kept one per handshake: 20,480 before OpenSSL's cache was full.)
    creds = ensure_server_credentials(tmp_path)
    server_ctx = server_context(creds.cert_chain, creds.key)
    client_ctx = only(client_context(creds.ca_cert), version)
    with trio.fail_after(30):
        await handshakes(client_ctx, server_ctx, "localhost")
    assert server_ctx.session_stats()["accept_good"] == HANDSHAKES
    assert kept(server_ctx, client_ctx) == [0, 0]
    assert server_ctx.num_tickets == 0  # nor does a client get any to keep


def peer_pair() -> tuple[tuple[ssl.SSLContext, ssl.SSLContext], tuple[ssl.SSLContext, ...]]:
    """(bob's listener, bob's dialer), (alice's ...): the contexts two logged-in clients get,
    with peer certificates from the server's peer CA."""
    issuer = Issuer.ephemeral()
    pairs = []
    for name in ("bob", "alice"):
        key = PeerKey()
        cert = issuer.issue(key.csr(name), name, dt.timedelta(hours=1))
        pairs.append(peer_contexts(cert.pem, key.private_pem(), issuer.ca_pem))
    return pairs[0], pairs[1]


async def test_neither_payee_nor_payer_keeps_a_tls_session_per_handshake() -> None:
    # Any registered user could make any online payee keep ~10 KB per mutual-TLS handshake.
    (bob_listener, bob_dialer), (alice_listener, alice_dialer) = peer_pair()
    with trio.fail_after(30):
        await handshakes(alice_dialer, bob_listener)  # alice pays bob
        await handshakes(bob_dialer, alice_listener)  # and bob alice
    assert bob_listener.session_stats()["accept_good"] == HANDSHAKES
    assert alice_dialer.session_stats()["connect_good"] == HANDSHAKES
    assert kept(bob_listener, alice_dialer, alice_listener, bob_dialer) == [0, 0, 0, 0]


async def test_peers_speak_tls_1_3_only() -> None:
    # Under TLS 1.2 a payer that offers no ticket leaves a cached session in the payee's
    # listener (the standard library cannot turn the cache off): peers do not speak it.
    (bob_listener, bob_dialer), (alice_listener, alice_dialer) = peer_pair()
    tls12 = ssl.TLSVersion.TLSv1_2
    alice_dialer.options |= ssl.OP_NO_TICKET
    with trio.fail_after(10):
        assert await refused(only(alice_dialer, tls12), bob_listener)
        assert await refused(bob_dialer, only(alice_listener, tls12))
    assert bob_listener.session_stats()["accept_good"] == 0
    assert alice_listener.session_stats()["accept_good"] == 0


async def refused(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> bool:
    """True if either end of an in-memory TLS handshake gives up on it."""
    a, b = trio.testing.memory_stream_pair()
    ends = (trio.SSLStream(a, client_ctx), trio.SSLStream(b, server_ctx, server_side=True))
    failed = []

    async def shake(end: trio.SSLStream[Any]) -> None:
        try:
            await end.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            failed.append(end)
            for either in ends:  # (the other end then hears EOF rather than waiting)
                await trio.aclose_forcefully(either.transport_stream)

    async with trio.open_nursery() as nursery:
        for end in ends:
            nursery.start_soon(shake, end)
    return bool(failed)


def _ensure_in_child(state: str, barrier: Any, out: Any) -> None:
    """One process of the race below: wait for all, then ensure the PKI; report what it got."""
    barrier.wait(timeout=60)
    creds = ensure_server_credentials(Path(state))
    issuer = Issuer.ensure(Path(state))
    receipts = ReceiptSigner.ensure(Path(state))
    out.put(
        (
            creds.ca_cert.read_bytes(),
            issuer.ca_pem,
            creds.cert_chain.read_bytes(),
            receipts.certificate_pem,
        )
    )


def test_processes_starting_on_one_empty_state_dir_share_one_pki(tmp_path: Path) -> None:
    """Several nodes started at once on one state directory: exactly one creates the CAs and
    the server certificate; every one ends with the same files (none half-written)."""
    state = tmp_path / "state"
    spawn = multiprocessing.get_context("spawn")
    n = 6
    barrier, out = spawn.Barrier(n), spawn.Queue()
    children = [
        spawn.Process(target=_ensure_in_child, args=(str(state), barrier, out)) for _ in range(n)
    ]
    for child in children:
        child.start()
    got = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len(set(got)) == 1, "the processes ended with different CAs or certificates"
    ca, peer_ca, chain, receipt = got[0]
    assert ca == (state / CA_CERT).read_bytes()
    assert peer_ca.encode() == (state / PEER_CA_CERT).read_bytes()
    assert chain == (state / SERVER_CERT).read_bytes()
    assert receipt.encode() == (state / RECEIPT_CERT).read_bytes()
    assert not [p.name for p in state.iterdir() if p.name.endswith(".tmp")]


def test_threads_starting_on_one_empty_state_dir_share_one_pki(tmp_path: Path) -> None:
    """The lock is per process too: threads of one process (the server's own to_thread calls)
    are kept apart as well, and a thread that holds it may take it again."""
    barrier = threading.Barrier(8)
    got: list[tuple[bytes, str]] = []

    def one() -> None:
        barrier.wait(timeout=30)
        with state_lock(tmp_path):  # re-entrant: ensure takes it again inside
            creds = ensure_server_credentials(tmp_path)
            got.append((creds.ca_cert.read_bytes(), Issuer.ensure(tmp_path).ca_pem))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(got) == 8 and len(set(got)) == 1


@pytest.mark.parametrize(("present", "missing"), [(CA_CERT, CA_KEY), (CA_KEY, CA_CERT)])
def test_a_ca_without_its_key_is_an_error_not_a_new_ca(
    tmp_path: Path, present: str, missing: str
) -> None:
    """A node given only ca.pem must not quietly make a CA of its own over it (every other
    node's clients trust the one it would replace)."""
    ensure_server_credentials(tmp_path)
    before = (tmp_path / present).read_bytes()
    (tmp_path / missing).unlink()
    with pytest.raises(ValueError, match=f"{present} is there but {missing} is not"):
        ensure_server_credentials(tmp_path)
    assert (tmp_path / present).read_bytes() == before


def test_a_peer_ca_without_its_key_is_an_error(tmp_path: Path) -> None:
    Issuer.ensure(tmp_path)
    (tmp_path / PEER_CA_KEY).unlink()
    with pytest.raises(IdentityError, match="is there but"):
        Issuer.ensure(tmp_path)
