"""``python -m p2ppay``: the same command line as ``p2ppay`` (server, client, admin, receipts)."""

from p2ppay.cli.main import main

raise SystemExit(main())
