"""`python -m dualrl.eval ...`: see `dualrl.eval.cli`."""

import sys

from dualrl.eval.cli import main

sys.exit(main())
