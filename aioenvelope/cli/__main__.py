"""``python -m aioenvelope.cli``: the console script without its launcher."""

import sys

from . import main

sys.exit(main())
