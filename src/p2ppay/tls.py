"""SSL contexts for every p2ppay connection: TLS 1.2 at least (1.3 between peers), certificates
always verified, and no TLS session state kept per handshake (:func:`keep_no_sessions`)."""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import trio


class MissingCA(FileNotFoundError):
    """The client has no CA certificate to verify the server with."""


def keep_no_sessions(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """No TLS session is kept for resumption: every connection does a full handshake, and a
    handshake leaves nothing behind once its connection is closed.

    Resumption buys nothing here (a p2ppay connection is long-lived, a payer's link to a payee
    is kept open), and kept sessions are memory anyone can make us spend: ``OP_NO_TICKET``
    under TLS 1.3 makes OpenSSL keep a *stateful* session in the context's cache for every
    handshake (up to 20,480 of ~10 KB each in a payee's client). The standard library cannot
    turn that cache off (no ``SSL_CTX_set_session_cache_mode``), so: no tickets at all
    (``num_tickets = 0``), and *without* ``OP_NO_TICKET``, which is what keeps a TLS 1.3
    server from caching (see ``ssl_update_cache`` in OpenSSL). A TLS 1.2 handshake from a
    client that offers no ticket extension is still cached by a server, with its 300-second
    timeout and OpenSSL's 20,480 bound: that is why the peer contexts take TLS 1.3 only.
    ``ctx.session_stats()["number"]`` is how many sessions a context holds."""
    ctx.options &= ~ssl.OP_NO_TICKET
    if ctx.protocol is not ssl.PROTOCOL_TLS_CLIENT:  # (a client's cannot be set: it sends none)
        ctx.num_tickets = 0
    return ctx


def server_context(cert_chain: Path | str, key: Path | str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_chain), str(key))
    return keep_no_sessions(ctx)


def client_context(cafile: Path | str) -> ssl.SSLContext:
    """A context that trusts ``cafile`` only and checks the server's name against it."""
    path = Path(cafile)
    if not path.is_file():
        raise MissingCA(
            f"no CA certificate at {path}: pass --cafile with the server's ca.pem "
            "(it is in the server's state directory)"
        )
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(path))
    except ssl.SSLError:
        raise MissingCA(
            f"cannot use {path} as the CA certificate: it holds no PEM certificate"
        ) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise MissingCA(f"cannot use {path} as the CA certificate: {reason}") from None
    return keep_no_sessions(harden_client_context(ctx))


def harden_client_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Only subjectAltName counts for the server's name: never a certificate's common name,
    # which for peer certificates is an account name that anyone may register.
    ctx.hostname_checks_common_name = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx


def _load_chain_from_memory(ctx: ssl.SSLContext, cert_pem: str, key_pem: bytes) -> None:
    # The ssl module loads keys from files only; a private directory that lives for the
    # duration of this call is the least exposure we can get.
    with tempfile.TemporaryDirectory(prefix="p2ppay-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cert_path, "w", encoding="ascii") as f:
            f.write(cert_pem)
        ctx.load_cert_chain(cert_path, key_path)


def peer_contexts(
    cert_pem: str, key_pem: bytes, peer_ca_pem: str
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(listener, dialer) contexts for the peer-to-peer leg: mutual TLS, both sides presenting
    the certificate the server issued for this session and trusting only the peer CA.
    TLS 1.3 only: both ends are p2ppay clients, and under TLS 1.2 a payer that offers no
    ticket would leave a cached session in the payee's listener per handshake (see
    :func:`keep_no_sessions`).

    Host names mean nothing between peers (they connect by IP), so the dialer does not check
    one; instead both sides read the account name from the verified certificate
    (:func:`peer_name`) and compare it with whom they expect.
    """
    listener = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    dialer = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx in (listener, dialer):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=peer_ca_pem)
        _load_chain_from_memory(ctx, cert_pem, key_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
        keep_no_sessions(ctx)
    dialer.check_hostname = False
    return listener, dialer


def peer_name(stream: Any) -> str | None:
    """The account name in the verified certificate the other end of ``stream`` presented."""
    cert = stream.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def explain_connect_failure(exc: BaseException, *, untrusted: str, closed: str) -> str:
    """One line saying why a TLS connection could not be made; ``untrusted`` is what to check
    when the other side's certificate is not trusted, ``closed`` why it may have hung up."""
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    if isinstance(exc, trio.BrokenResourceError):
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"its certificate is not trusted ({cause.verify_message}); {untrusted}"
        eof = isinstance(cause, ssl.SSLEOFError) or (
            isinstance(cause, ssl.SSLError) and cause.reason == "UNEXPECTED_EOF_WHILE_READING"
        )
        if isinstance(cause, ssl.SSLError) and not eof:
            reason = (cause.reason or str(cause)).lower().replace("_", " ")
            return f"TLS failed ({reason}); is this a p2ppay port?"
        return f"the connection was closed during the TLS handshake ({closed})"
    if isinstance(exc, OSError):
        # trio's open_tcp_stream says "all attempts failed" and keeps the reasons in __cause__.
        cause = exc.__cause__
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            first = cause.exceptions[0]
            if isinstance(first, OSError) and first.errno:
                return os.strerror(first.errno).lower()
        if exc.errno and not isinstance(exc, socket.gaierror):
            return os.strerror(exc.errno).lower()
        if exc.strerror:
            return exc.strerror.lower()
    return str(exc) or type(exc).__name__
