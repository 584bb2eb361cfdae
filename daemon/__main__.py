"""`python -m daemon` is the `trainguard` command."""

from daemon.cli import main

raise SystemExit(main())
