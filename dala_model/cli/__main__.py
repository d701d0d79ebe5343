"""`python -m dala_model.cli` == `dala` (used by tests and subprocess workers)."""

import sys

from dala_model.cli import main

sys.exit(main())
