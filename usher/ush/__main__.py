"""``python -m usher.ush``: the same as the ``ush`` command."""

import sys

from usher.ush.cli import main

sys.exit(main())
