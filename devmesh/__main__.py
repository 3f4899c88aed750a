from devmesh.cli import main

raise SystemExit(main())
