"""The ``coalmine`` command line: commands, the admin client, demo, validate, replay."""

from coalmine.cli.commands import main

__all__ = ["main"]
