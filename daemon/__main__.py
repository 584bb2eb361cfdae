"""`python -m daemon` is the `trainguard` command."""

from trainguard.cli import main

raise SystemExit(main())
