"""`python -m prefixcap`, which is also what `accelerate launch -m prefixcap` runs."""

import sys

from prefixcap.cli import main

sys.exit(main())
