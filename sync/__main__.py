"""`python -m sync` is the same as the `crowd-sync` command."""

from sync.cli import main

raise SystemExit(main())
