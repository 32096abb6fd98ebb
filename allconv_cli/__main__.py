"""``python -m allconv_cli``: the ``allconv`` command without the console script."""

from allconv_cli.cli import run

run()
