"""The people's layer: the ``p2ppay`` command (server, client, admin, verify-receipt) and its shell.

:mod:`.main` parses the command line; :mod:`.shell` is the client's interactive and scripted
shell over the :class:`~p2ppay.client.wallet.Wallet`; :mod:`.terminal` owns the terminal;
:mod:`.admin` is the operator's commands; :mod:`.profiles` and :mod:`.exitcodes` what they share.
"""
