"""``python -m still_cli``: the ``still`` command."""

from still_cli.main import console_main

console_main()
