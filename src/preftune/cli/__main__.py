"""`python -m preftune.cli VERB ...`: the same as the `preftune` command."""

import sys

from preftune.cli.main import main

sys.exit(main())
