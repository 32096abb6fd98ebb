"""The ``allconv`` command line, one module per command over the library."""

from allconv_cli.cli.app import app, run

__all__ = ["app", "run"]
