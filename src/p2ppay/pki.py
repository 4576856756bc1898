"""The local certificate authority, the certificates it issues, and what they sign (cryptography).

On first start the server makes, in its state directory, a CA (EC P-256) and a server
certificate signed by it for localhost, 127.0.0.1, ::1, the host's name and any extra names.
Clients on the same machine trust ``ca.pem`` from the same directory with no flags.

Several server processes may share one state directory (``--workers``, or several nodes started
at once): whoever comes first creates the CAs and the server certificate under an exclusive
lock on ``.pki.lock`` (:func:`state_lock`), and the others then find and use them. Every file is
written to a temporary name and renamed into place, so nobody ever reads half a file.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2ppay.wire.names import name_key

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
PEER_CA_CERT = "peer-ca.pem"
PEER_CA_KEY = "peer-ca.key"
#: the lock file in the state directory that serialises creating and renewing the files above
LOCK_FILE = ".pki.lock"

CA_LIFETIME = dt.timedelta(days=3650)
SERVER_LIFETIME = dt.timedelta(days=397)
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class ServerCredentials:
    cert_chain: Path  # the server certificate followed by the CA certificate
    key: Path
    ca_cert: Path


def default_sans(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    for name in extra:
        if name not in names:
            names.append(name)
    return tuple(names)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@contextmanager
def _atomic(path: Path, mode: int) -> Iterator[int]:
    """A file descriptor to write ``path``'s new content to; renamed into place (atomically)
    only when the block ends without an error. The temporary name is unique, so processes that
    write at once never write into each other's file."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, atomically; never world-readable, even briefly."""
    with _atomic(path, 0o600) as fd:
        _write_all(fd, data)


def write_public(path: Path, data: bytes) -> None:
    with _atomic(path, 0o644) as fd:
        _write_all(fd, data)


#: state directories this process holds the lock of, with how deeply (the lock is re-entrant)
_HELD: dict[str, int] = {}
#: one thread of this process at a time (flock alone would not keep two threads apart, and
#: would deadlock a thread that takes it again through another file descriptor)
_LOCAL = threading.RLock()


@contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold the state directory's PKI lock: an exclusive ``flock`` on ``.pki.lock`` there, so
    that of several processes (or threads) starting on one empty directory exactly one creates
    the CAs and the others wait and then load them. Re-entrant within a thread."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = str(state_dir.resolve())
    with _LOCAL:
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, or the process dies
            _HELD[key] = 1
            try:
                yield
            finally:
                del _HELD[key]
        finally:
            os.close(fd)


def _pair_present(cert_path: Path, key_path: Path) -> bool:
    """Whether a certificate and its key are both there (False: neither is). One without the
    other is an error, not a reason to make a new CA over it: a node given only ``ca.pem``
    would otherwise replace the CA every other node and client trusts."""
    cert, key = cert_path.is_file(), key_path.is_file()  # (a directory in the way: an error later)
    if cert != key:
        have, lack = (cert_path, key_path) if cert else (key_path, cert_path)
        raise ValueError(f"{have.name} is there but {lack.name} is not: copy both, or neither")
    return cert


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(
    common_name: str = "p2ppay local CA",
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = utc_now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, sans: tuple[str, ...]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = utc_now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in sans]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _cert_sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.value.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.value.get_values_for_type(x509.IPAddress)
    }


def _normalise(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def load_or_create_ca(
    state_dir: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    """The state directory's CA (``ca.pem``, ``ca.key``), made if missing; True if just made
    (under the state directory's lock: several processes may start on it at once)."""
    with state_lock(state_dir):
        ca_path, ca_key_path = state_dir / CA_CERT, state_dir / CA_KEY
        if _pair_present(ca_path, ca_key_path):
            ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{ca_key_path} is not an EC private key")
            return ca_cert, loaded, False
        ca_cert, ca_key = create_ca()
        write_private(ca_key_path, key_pem(ca_key))
        write_public(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        return ca_cert, ca_key, True


def ensure_server_credentials(
    state_dir: Path, extra_sans: tuple[str, ...] = ()
) -> ServerCredentials:
    """Create the CA and the server certificate if missing, expiring, or lacking a name (under
    the state directory's lock: several processes may start on it at once)."""
    with state_lock(state_dir):
        return _ensure_server_credentials(state_dir, extra_sans)


def _ensure_server_credentials(state_dir: Path, extra_sans: tuple[str, ...]) -> ServerCredentials:
    ca_path = state_dir / CA_CERT
    cert_path, key_path = state_dir / SERVER_CERT, state_dir / SERVER_KEY

    ca_cert, ca_key, created = load_or_create_ca(state_dir)
    if created:
        cert_path.unlink(missing_ok=True)  # anything signed by an older CA is void

    sans = default_sans(extra_sans)
    renew = True
    if cert_path.exists() and key_path.exists():
        current = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        renew = (
            current.issuer != ca_cert.subject
            or current.not_valid_after_utc - utc_now() < RENEW_BEFORE
            or not {_normalise(n) for n in sans} <= _cert_sans(current)
        )
    if renew:
        cert, key = issue_server_cert(ca_cert, ca_key, sans)
        write_private(key_path, key_pem(key))
        write_public(
            cert_path,
            cert.public_bytes(serialization.Encoding.PEM)
            + ca_cert.public_bytes(serialization.Encoding.PEM),
        )
    return ServerCredentials(cert_path, key_path, ca_path)


# --------------------------------------------------------------------------------------------
# Peer identities: short-lived certificates naming an account, and the acceptances they sign
# --------------------------------------------------------------------------------------------

PEER_CA_NAME = "p2ppay peer CA"
#: The first acceptance format: no memo (still verified for payments without one; see
#: :func:`verify_acceptance`).
ACCEPTANCE_CONTEXT_V1 = b"p2ppay-acceptance-v1\n"
#: Today's format: the memo is signed too.
ACCEPTANCE_CONTEXT = b"p2ppay-acceptance-v2\n"


class IdentityError(ValueError):
    """A CSR, certificate or signature is not what it must be."""


def new_peer_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    """A PEM certificate signing request for ``name``, proving possession of ``key``."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    pem: str
    public_key: ec.EllipticCurvePublicKey
    not_after: dt.datetime


class Issuer:
    """The server's CA in its role of vouching for account names (peer certificates)."""

    def __init__(self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
        self.ca_cert = ca_cert
        self.ca_key = ca_key
        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @classmethod
    def ensure(cls, state_dir: Path) -> Issuer:
        """Load the peer CA from ``state_dir``, creating it on first start.

        It is a CA of its own, apart from the one that signs the server's certificate: a peer
        certificate (whose name an account holder chooses) can then never pass for the server.
        """
        with state_lock(state_dir):
            cert_path, key_path = state_dir / PEER_CA_CERT, state_dir / PEER_CA_KEY
            try:
                present = _pair_present(cert_path, key_path)
            except ValueError as exc:
                raise IdentityError(str(exc)) from None
            if present:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                key = serialization.load_pem_private_key(key_path.read_bytes(), None)
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise IdentityError(f"{key_path} is not an EC private key")
                return cls(cert, key)
            cert, key = create_ca(PEER_CA_NAME)
            write_private(key_path, key_pem(key))
            write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            return cls(cert, key)

    @classmethod
    def ephemeral(cls) -> Issuer:
        """A throwaway peer CA, for tests."""
        return cls(*create_ca(PEER_CA_NAME))

    def issue(
        self,
        csr_pem: str,
        name: str,
        lifetime: dt.timedelta,
        *,
        until: dt.datetime | None = None,
    ) -> PeerCertificate:
        """Certify the CSR's key as ``name`` (the CSR's own subject is ignored) for
        ``lifetime``, or only ``until`` if that is sooner."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise IdentityError(f"not a PEM certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise IdentityError("the CSR's signature does not match its key")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise IdentityError("peer keys must be EC P-256")
        now = utc_now()
        not_after = now + lifetime if until is None else min(now + lifetime, until)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        return PeerCertificate(
            cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), public_key, not_after
        )


def public_key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key_der(der: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError("not an EC public key")
    return key


def acceptance_bytes(
    payment_id: str, payer: str, payee: str, amount: int, memo: str | None = None
) -> bytes:
    """The exact bytes a payee signs to accept a payment (format v2, see docs/protocol.md).

    Names are signed in their canonical form, so the letter case an offer used does not
    matter; names cannot contain a newline and a memo has no control characters (it is
    checked before anything is signed or verified), so the encoding is unambiguous. No memo
    is an empty last line (a memo is never empty)."""
    payer, payee = name_key(payer), name_key(payee)
    return ACCEPTANCE_CONTEXT + f"{payment_id}\n{payer}\n{payee}\n{amount}\n{memo or ''}\n".encode()


def acceptance_bytes_v1(payment_id: str, payer: str, payee: str, amount: int) -> bytes:
    """The first format's bytes (no memo): what clients before memos signed."""
    payer, payee = name_key(payer), name_key(payee)
    return ACCEPTANCE_CONTEXT_V1 + f"{payment_id}\n{payer}\n{payee}\n{amount}\n".encode("ascii")


def sign_acceptance(
    key: ec.EllipticCurvePrivateKey,
    payment_id: str,
    payer: str,
    payee: str,
    amount: int,
    memo: str | None = None,
) -> bytes:
    return key.sign(
        acceptance_bytes(payment_id, payer, payee, amount, memo), ec.ECDSA(hashes.SHA256())
    )


def sign_acceptance_v1(
    key: ec.EllipticCurvePrivateKey, payment_id: str, payer: str, payee: str, amount: int
) -> bytes:
    """An acceptance in the first format (no memo): what clients before memos signed, and
    what a server from before memos checks."""
    return key.sign(
        acceptance_bytes_v1(payment_id, payer, payee, amount), ec.ECDSA(hashes.SHA256())
    )


def verify_acceptance(
    key: ec.EllipticCurvePublicKey,
    signature: bytes,
    payment_id: str,
    payer: str,
    payee: str,
    amount: int,
    memo: str | None = None,
) -> bool:
    """Whether ``signature`` is ``key``'s acceptance of this payment: format v2; or, for a
    payment without a memo only, format v1 (whose bytes then cover all the payment carries,
    so accepting it is as safe as ever; a payment with a memo needs v2, which covers it)."""
    formats = [acceptance_bytes(payment_id, payer, payee, amount, memo)]
    if memo is None:
        formats.append(acceptance_bytes_v1(payment_id, payer, payee, amount))
    for data in formats:
        try:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return True
    return False


def public_key_line(cert_pem: bytes) -> str:
    """The first certificate's public key as one line: base64 of its DER SubjectPublicKeyInfo
    (what the course dialect's login reply calls the server's public key)."""
    import base64

    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")
