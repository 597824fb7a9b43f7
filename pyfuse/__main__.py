"""`python -m pyfuse ...`: the command line, for environments where the `pyfuse` script is not on PATH."""

from .cli import main

raise SystemExit(main())
