from tide_local.cli import main

raise SystemExit(main())
