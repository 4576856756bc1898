"""Signed receipts: the server's signed statement that a payment was settled, checkable offline.

The server signs receipts with a key of its own (``receipt.key``), certified by the state
directory's CA (``ca.pem``, the CA clients already trust for the server's TLS certificate) in
``receipt.pem``. The certificate says what the key is for: key usage *content commitment*
(non-repudiation) and nothing else, and the common name :data:`SIGNER_NAME`; the server's TLS
certificate has neither, so it cannot pass for a receipt signer, nor a receipt key for a server.

A receipt is a JSON object (:data:`FIELDS`); the signature covers :func:`receipt_bytes`, exact
bytes documented in docs/protocol.md. :func:`verify_receipt` checks one with ``cryptography``
alone, against a CA certificate: no server, no network.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2ppay.pki import (
    CA_LIFETIME,
    RENEW_BEFORE,
    key_pem,
    load_or_create_ca,
    state_lock,
    utc_now,
    write_private,
    write_public,
)
from p2ppay.wire.constraints import MAX_AMOUNT, is_memo
from p2ppay.wire.names import is_valid_name

RECEIPT_CERT: Final = "receipt.pem"
RECEIPT_KEY: Final = "receipt.key"
#: The receipt signer certificate's common name.
SIGNER_NAME: Final = "p2ppay receipts"
#: The receipt format; also the first line of the signed bytes.
FORMAT: Final = "p2ppay-receipt-v1"
#: Every field of a receipt, and no other.
FIELDS: Final = frozenset(
    {
        "format",
        "payment_id",
        "payer",
        "payee",
        "amount",
        "memo",
        "at_ms",
        "certificate",
        "signature",
    }
)
_CANONICAL_UUID_LEN: Final = 36


class ReceiptInvalid(ValueError):
    """The receipt does not verify; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class ReceiptFacts:
    """What a receipt states."""

    payment_id: str
    payer: str  # as registered
    payee: str
    amount: int
    memo: str | None
    at_ms: int

    def summary(self) -> str:
        when = dt.datetime.fromtimestamp(self.at_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        memo = f" for {self.memo!r}" if self.memo is not None else ""
        return (
            f"valid receipt: {self.payer} paid {self.payee} {self.amount}{memo} "
            f"at {when} UTC (payment {self.payment_id})"
        )


def receipt_bytes(facts: ReceiptFacts) -> bytes:
    """The exact bytes the server signs: the format, then one field a line, names as
    registered (they contain no newline; a memo contains no control character), no memo as
    an empty line (a memo is never empty)."""
    f = facts
    return (
        f"{FORMAT}\n{f.payment_id}\n{f.payer}\n{f.payee}\n{f.amount}\n{f.at_ms}\n{f.memo or ''}\n"
    ).encode()


def _issue_signer_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = utc_now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SIGNER_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + CA_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=True,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


@final
class ReceiptSigner:
    """The server's receipt key and its certificate."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self.key = key
        self.certificate = certificate
        self.certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @classmethod
    def ensure(cls, state_dir: Path) -> ReceiptSigner:
        """Load the receipt key from ``state_dir``; make it (and the CA, if missing) on first
        start, and certify it again when the CA changed or the certificate nears its end.
        Blocking; under the state directory's lock (nodes sharing it may start at once)."""
        with state_lock(state_dir):
            return cls._ensure(state_dir)

    @classmethod
    def _ensure(cls, state_dir: Path) -> ReceiptSigner:
        ca_cert, ca_key, _ = load_or_create_ca(state_dir)
        cert_path, key_path = state_dir / RECEIPT_CERT, state_dir / RECEIPT_KEY
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            if (
                cert.issuer == ca_cert.subject
                and cert.not_valid_after_utc - utc_now() > RENEW_BEFORE
                and _signed_by(cert, ca_cert)
            ):
                return cls(key, cert)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(key_path, key_pem(key))
        cert = _issue_signer_cert(ca_cert, ca_key, key)
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert)

    @classmethod
    def ephemeral(cls, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> ReceiptSigner:
        """A signer certified by ``ca`` that lives in memory only (tests)."""
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, _issue_signer_cert(ca[0], ca[1], key))

    def sign(self, facts: ReceiptFacts) -> dict[str, Any]:
        """The receipt for ``facts``, as a JSON-ready object. Blocking (a signature, ~50 us)."""
        signature = self.key.sign(receipt_bytes(facts), ec.ECDSA(hashes.SHA256()))
        return {
            "format": FORMAT,
            "payment_id": facts.payment_id,
            "payer": facts.payer,
            "payee": facts.payee,
            "amount": facts.amount,
            "memo": facts.memo,
            "at_ms": facts.at_ms,
            "certificate": self.certificate_pem,
            "signature": base64.b64encode(signature).decode("ascii"),
        }


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    ca_key = ca_cert.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey):
        return False
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        return False
    return True


def _facts(receipt: object) -> ReceiptFacts:
    """The statement in ``receipt``, every field checked for its type and range."""
    if not isinstance(receipt, dict):
        raise ReceiptInvalid("a receipt is a JSON object")
    keys = set(receipt)
    if keys != FIELDS:
        missing, extra = sorted(FIELDS - keys), sorted(str(k) for k in keys - FIELDS)
        raise ReceiptInvalid(f"wrong fields (missing: {missing or '-'}; unknown: {extra or '-'})")
    if receipt["format"] != FORMAT:
        raise ReceiptInvalid(f"unknown format {receipt['format']!r} (this p2ppay knows {FORMAT})")
    pid = receipt["payment_id"]
    if not isinstance(pid, str) or len(pid) != _CANONICAL_UUID_LEN or _uuid_text(pid) != pid:
        raise ReceiptInvalid("payment_id is not a UUID in canonical form")
    for field in ("payer", "payee"):
        if not isinstance(receipt[field], str) or not is_valid_name(receipt[field]):
            raise ReceiptInvalid(f"{field} is not an account name")
    amount = receipt["amount"]
    if type(amount) is not int or not 1 <= amount <= MAX_AMOUNT:
        raise ReceiptInvalid("amount is not a positive whole number")
    memo = receipt["memo"]
    if memo is not None and not is_memo(memo):
        raise ReceiptInvalid("memo is not a memo (1-140 printable characters, or null)")
    at_ms = receipt["at_ms"]
    if type(at_ms) is not int or not 0 <= at_ms < 2**53:
        raise ReceiptInvalid("at_ms is not a time in milliseconds")
    return ReceiptFacts(pid, receipt["payer"], receipt["payee"], amount, memo, at_ms)


def _uuid_text(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def verify_receipt(receipt: object, ca_cert: x509.Certificate) -> ReceiptFacts:
    """What ``receipt`` states, if the server whose CA is ``ca_cert`` signed exactly that;
    else :class:`ReceiptInvalid` saying why. Offline: ``cryptography`` only."""
    facts = _facts(receipt)
    assert isinstance(receipt, dict)
    pem, signature_text = receipt["certificate"], receipt["signature"]
    if not isinstance(pem, str) or not isinstance(signature_text, str):
        raise ReceiptInvalid("certificate and signature must be text")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ReceiptInvalid("the signer's certificate cannot be read") from None
    if cert.issuer != ca_cert.subject or not _signed_by(cert, ca_cert):
        raise ReceiptInvalid("the signer's certificate was not issued by this CA")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except x509.ExtensionNotFound:
        raise ReceiptInvalid("the certificate is not a receipt signer's") from None
    if not usage.content_commitment or constraints.ca or [n.value for n in names] != [SIGNER_NAME]:
        raise ReceiptInvalid("the certificate is not a receipt signer's")
    when = dt.datetime.fromtimestamp(facts.at_ms / 1000, dt.UTC)
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise ReceiptInvalid("the receipt's time is outside its signer certificate's validity")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ReceiptInvalid("the signer's key is not an EC key")
    try:
        signature = base64.b64decode(signature_text, validate=True)
        key.verify(signature, receipt_bytes(facts), ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        raise ReceiptInvalid(
            "the signature does not match: the receipt was altered or forged"
        ) from None
    return facts
