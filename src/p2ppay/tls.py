"""SSL contexts for every p2ppay connection: TLS 1.2 at least, certificates always verified."""

from __future__ import annotations

import ssl
from pathlib import Path


class MissingCA(FileNotFoundError):
    """The client has no CA certificate to verify the server with."""


def server_context(cert_chain: Path | str, key: Path | str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_chain), str(key))
    # Every client session is a long-lived connection; tickets only cost memory here.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def client_context(cafile: Path | str) -> ssl.SSLContext:
    """A context that trusts ``cafile`` only and checks the server's name against it."""
    path = Path(cafile)
    if not path.is_file():
        raise MissingCA(
            f"no CA certificate at {path}: pass --cafile with the server's ca.pem "
            "(it is in the server's state directory)"
        )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    return ctx
