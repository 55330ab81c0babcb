"""``python -m diffcache`` is the ``diffcache`` command."""

import sys

from diffcache.cli import main

sys.exit(main())
