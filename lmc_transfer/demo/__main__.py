from lmc_transfer.demo.run import main

raise SystemExit(main())
