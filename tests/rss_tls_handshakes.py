"""How much a payee's memory grows with mutual-TLS handshakes from a payer (issue 22.6).

Not a pytest test (it takes a minute and measures a whole process): run it by hand,

    .venv/bin/python -m tests.rss_tls_handshakes [--handshakes 10000] [--concurrency 4]

The payee is a child process running the client's real payer listener (``OfferListener``, the
contexts of ``tls.peer_contexts``) on 127.0.0.1; this process is the payer, with a certificate
from the same peer CA, and makes one connection per handshake: handshake, then a clean close
(the payee then sees the payer leave, as when a payer goes). The payee's resident set size is
read from /proc before (after a warm-up, so that the allocator's first growth does not count)
and after, with the number of TLS sessions its listener context holds. It prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from p2ppay.client.peer import OfferListener, PeerIdentity, PeerKey, accept_all
from p2ppay.pki import Issuer, key_pem

WARM_UP = 1000


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def identity(pki: Path, name: str) -> PeerIdentity:
    """``name``'s peer identity, certified by the peer CA saved in ``pki``."""
    saved = json.loads(pki.read_text())
    ca = x509.load_pem_x509_certificate(saved["cert"].encode())
    ca_key = serialization.load_pem_private_key(saved["key"].encode(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    issuer = Issuer(ca, ca_key)
    key = PeerKey()
    cert = issuer.issue(key.csr(name), name, dt.timedelta(hours=1))
    return PeerIdentity.build(name, key, cert.pem, issuer.ca_pem)


# --- the payee (child process) -----------------------------------------------------------------


async def payee(pki: Path) -> None:
    """Listen; print the port; then answer each line on stdin with the figures, until EOF."""
    bob = identity(pki, "bob")
    listener = OfferListener(bob, accept_all)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.serve, listeners)
        print(listeners[0].socket.getsockname()[1], flush=True)
        while await trio.to_thread.run_sync(sys.stdin.readline):
            await trio.sleep(0.5)  # the last connections' payee tasks finish
            gc.collect()
            stats = bob.listener_context.session_stats()
            figures = {"rss": rss_bytes(), "sessions": stats["number"]}
            figures["accepted"] = listener.connections_accepted
            print(json.dumps(figures), flush=True)
        nursery.cancel_scope.cancel()


# --- the payer (this process) ------------------------------------------------------------------


async def handshakes(port: int, alice: PeerIdentity, count: int, concurrency: int) -> int:
    done = 0

    async def one_after_another(share: int) -> None:
        nonlocal done
        for _ in range(share):
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(transport, alice.dialer_context)
            await stream.do_handshake()
            await stream.aclose()
            done += 1

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(one_after_another, count // concurrency + (i < count % concurrency))
    return done


def ask(child: subprocess.Popen[str]) -> dict[str, Any]:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("figures\n")
    child.stdin.flush()
    figures: dict[str, Any] = json.loads(child.stdout.readline())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--payee", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.payee is not None:
        trio.run(payee, args.payee)
        return
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "peer-ca.json"
        issuer = Issuer.ephemeral()
        ca, ca_key = issuer.ca_cert, issuer.ca_key
        pem = ca.public_bytes(serialization.Encoding.PEM).decode()
        pki.write_text(json.dumps({"cert": pem, "key": key_pem(ca_key).decode()}))
        alice = identity(pki, "alice")
        cmd = [sys.executable, "-m", "tests.rss_tls_handshakes", "--payee", str(pki)]
        with subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as child:
            assert child.stdout is not None and child.stdin is not None
            port = int(child.stdout.readline())
            trio.run(handshakes, port, alice, WARM_UP, args.concurrency)
            before = ask(child)
            made = trio.run(handshakes, port, alice, args.handshakes, args.concurrency)
            after = ask(child)
            child.stdin.close()
            child.wait(timeout=30)
    growth = (after["rss"] - before["rss"]) / 2**20
    print(
        json.dumps(
            {
                "handshakes": made,
                "payee_rss_before_mib": round(before["rss"] / 2**20, 1),
                "payee_rss_after_mib": round(after["rss"] / 2**20, 1),
                "payee_rss_growth_mib": round(growth, 1),
                "payee_sessions_before": before["sessions"],
                "payee_sessions_after": after["sessions"],
                "payee_connections_accepted": after["accepted"],
            }
        )
    )


if __name__ == "__main__":
    main()
