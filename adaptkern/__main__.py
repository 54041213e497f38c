"""``python -m adaptkern``: the ``adaptkern`` command."""

import sys

from adaptkern.cli import main

sys.exit(main())
