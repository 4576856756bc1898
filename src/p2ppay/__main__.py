from p2ppay.cli.main import main

raise SystemExit(main())
