from mqd.cli import main

raise SystemExit(main())
