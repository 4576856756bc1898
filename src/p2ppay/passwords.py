"""Slow salted password hashes (scrypt) and their constant-time check.

Both functions block for tens of milliseconds: call them in a worker thread."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

from p2ppay.settings import count, setting

_PREFIX = "scrypt"


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost. The default costs about 16 MiB and tens of milliseconds per hash."""

    n: int = setting(
        2**14, "--scrypt-n", "scrypt cost for new password hashes (a power of 2)", count
    )
    r: int = setting(8, "--scrypt-r", "scrypt block size for new password hashes", count)
    p: int = setting(1, "--scrypt-p", "scrypt parallelism for new password hashes", count)

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1):
            raise ValueError("--scrypt-n must be a power of 2 (at least 2)")

    @property
    def maxmem(self) -> int:
        return 128 * self.n * self.r * self.p + 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, params: ScryptParams = ScryptParams()) -> str:
    """A self-describing hash string: ``scrypt$n$r$p$salt$digest``."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=32,
    )
    return f"{_PREFIX}${params.n}${params.r}${params.p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored``; the comparison takes constant time."""
    try:
        prefix, n, r, p, salt, digest = stored.split("$")
        if prefix != _PREFIX:
            return False
        params = ScryptParams(int(n), int(r), int(p))
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=params.n,
            r=params.r,
            p=params.p,
            maxmem=params.maxmem,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)
