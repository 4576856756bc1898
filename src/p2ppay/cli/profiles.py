"""Where the client connects, without retyping flags: environment variables and an optional
TOML profile in the user's config directory. Flags beat the environment, which beats the
profile, which beats the defaults. No I/O beyond reading the profile file."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast, final

import platformdirs

from p2ppay.wire.constraints import MAX_PORT

SERVER_ENV: Final = "P2PPAY_SERVER"
CAFILE_ENV: Final = "P2PPAY_CAFILE"
USER_ENV: Final = "P2PPAY_USER"
PROFILE_FILE: Final = "client.toml"
#: The keys a profile may hold (a key not here is refused: it is likely a typo).
PROFILE_KEYS: Final = ("server", "cafile", "server_name", "user", "password_file", "accept")
ACCEPT_CHOICES: Final = ("ask", "all", "none")


class ProfileError(Exception):
    """A profile or an environment variable that cannot be used; the text is one line."""


def profile_path() -> Path:
    """``client.toml`` in the user's config directory (``~/.config/p2ppay`` on Linux)."""
    return Path(platformdirs.user_config_dir("p2ppay", appauthor=False)) / PROFILE_FILE


def parse_server(text: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT`` (a bare IPv6 address has no
    port). Raises ValueError with the reason."""
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not HOST:PORT ([...] around an IPv6 address)")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    if not host:
        raise ValueError(f"{text!r} names no host")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= MAX_PORT:
        raise ValueError(f"{text!r}: the port must be a number from 1 to {MAX_PORT}")
    return host, int(port_text)


@final
@dataclass(frozen=True, slots=True)
class Profile:
    """What a profile file says (every field optional). Paths are resolved against the
    file's directory, ``~`` expanded."""

    server: tuple[str, int] | None = None
    cafile: Path | None = None
    server_name: str | None = None
    user: str | None = None
    password_file: Path | None = None
    accept: Literal["ask", "all", "none"] | None = None
    path: Path | None = None


def load_profile(path: Path, default_port: int) -> Profile:
    """The profile at ``path`` (an empty one if there is no such file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Profile()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    return _profile(table, path, default_port)


def _profile(table: Mapping[str, Any], path: Path, default_port: int) -> Profile:
    unknown = sorted(set(table) - set(PROFILE_KEYS))
    if unknown:
        raise ProfileError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(PROFILE_KEYS)})")
    for key, value in table.items():
        if not isinstance(value, str) or not value:
            raise ProfileError(f"{path}: {key} must be a non-empty string")
    values: dict[str, str] = dict(table)
    server = None
    if "server" in values:
        try:
            server = parse_server(values["server"], default_port)
        except ValueError as exc:
            raise ProfileError(f"{path}: server: {exc}") from None
    accept = values.get("accept")
    if accept is not None and accept not in ACCEPT_CHOICES:
        raise ProfileError(f"{path}: accept must be one of {', '.join(ACCEPT_CHOICES)}")

    def resolved(key: str) -> Path | None:
        if key not in values:
            return None
        return path.parent / Path(values[key]).expanduser()

    return Profile(
        server=server,
        cafile=resolved("cafile"),
        server_name=values.get("server_name"),
        user=values.get("user"),
        password_file=resolved("password_file"),
        accept=cast(Literal["ask", "all", "none"] | None, accept),
        path=path,
    )


@final
@dataclass(frozen=True, slots=True)
class Connection:
    """Where and as whom the client connects, every setting decided."""

    host: str
    port: int
    cafile: Path
    server_name: str | None
    user: str | None
    password_file: Path | None
    accept: Literal["ask", "all", "none"]


def resolve(
    *,
    host: str | None,
    port: int | None,
    cafile: Path | None,
    server_name: str | None,
    user: str | None,
    password_file: Path | None,
    accept: Literal["ask", "all", "none"] | None,
    env: Mapping[str, str],
    profile: Profile,
    default_port: int,
    default_cafile: Path,
) -> Connection:
    """Each setting from the first that has it: flags, environment, profile, default.

    HOST and PORT go together: a HOST given as a flag takes PORT from the flags or the
    default, never the port of another source's server; the profile's ``server_name`` goes
    with the profile's ``server``."""
    if host is not None:
        where = (host, port if port is not None else default_port)
    elif env.get(SERVER_ENV):
        try:
            where = parse_server(env[SERVER_ENV], default_port)
        except ValueError as exc:
            raise ProfileError(f"{SERVER_ENV}: {exc}") from None
    elif profile.server is not None:
        where = profile.server
        # (the profile's server_name is for the profile's server only)
        server_name = server_name or profile.server_name
    else:
        where = ("localhost", default_port)
    env_cafile = Path(env[CAFILE_ENV]).expanduser() if env.get(CAFILE_ENV) else None
    return Connection(
        host=where[0],
        port=where[1],
        cafile=cafile or env_cafile or profile.cafile or default_cafile,
        server_name=server_name,
        user=user or env.get(USER_ENV) or profile.user,
        password_file=password_file or profile.password_file,
        accept=accept or profile.accept or "ask",
    )
