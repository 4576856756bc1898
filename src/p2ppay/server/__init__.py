"""The p2ppay server, in layers (each module has one job):

- :mod:`.config`: every limit (:class:`ServerConfig`) and how to run a process
- :mod:`.admission`: connection limits and the TLS handshake
- :mod:`.presence`: who is online, where (both dialects); :mod:`.pg_presence` shares it
  between the nodes of one PostgreSQL database
- :mod:`.accounts`: passwords, throttling, certificates, acceptance checks
- :mod:`.base`: what every session is; :mod:`.native` and :mod:`.course_session` are the two
- :mod:`.app`: the :class:`Server` that owns the connections and the order of shutdown
- :mod:`.runner`: the real process (state directory, listeners, ledger file, signals)
"""

from p2ppay.server.app import Server
from p2ppay.server.config import DEFAULT_PORT, LEDGER_FILE, ServerConfig, ServerOptions
from p2ppay.server.errors import RequestFailed
from p2ppay.server.runner import StartupError, prepare_state_dir, run_server

__all__ = [
    "DEFAULT_PORT",
    "LEDGER_FILE",
    "RequestFailed",
    "Server",
    "ServerConfig",
    "ServerOptions",
    "StartupError",
    "prepare_state_dir",
    "run_server",
]
