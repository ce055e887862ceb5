from lmc_transfer.daemon.server import main

raise SystemExit(main())
