"""The client library: one person's side of p2ppay, below any user interface.

:mod:`.connection` is one TLS connection to the server; :mod:`.peer` the peer-to-peer leg (the
payee's listener and the payer's links); :mod:`.wallet` the agent built on both, and
:mod:`.outcomes` how a payment can end.
"""
