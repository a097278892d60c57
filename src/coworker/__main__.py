from coworker.cli import main

raise SystemExit(main())
