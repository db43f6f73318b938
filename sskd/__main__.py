"""``python -m sskd ...`` (and ``accelerate launch -m sskd ...``) run the same CLI as ``sskd``."""

import sys

from sskd.cli import main

sys.exit(main())
