"""Command-line conventions shared by every script (pure Python: the PyTorch-only scripts use it
too): bad arguments give one line on stderr and exit status 2, no usage dump."""

from __future__ import annotations

import argparse
import os


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(file: str, doc: str, **kw) -> ArgumentParser:
    """The parser of a script: its file name as `prog`, the docstring's first line as the
    description and the rest as the epilog."""
    lines = (doc or "").strip("\n").split("\n")
    return ArgumentParser(prog=os.path.basename(file), description=lines[0], epilog="\n".join(lines[1:]),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
