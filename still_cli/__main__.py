"""``python -m still_cli``: the ``still`` command."""

import sys

from still_cli.main import main

sys.exit(main())
