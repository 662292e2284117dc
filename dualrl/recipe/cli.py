"""What the command lines (`dualrl.launch`, `dualrl.export`, `dualrl.eval`) share: a malformed call ends with one
`error:` line on stderr and exit status 2, before anything is built or written."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors (a missing argument, an unknown flag, a value not among the choices) are one
    `error:` line naming the --help to read, rather than the usage followed by the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message: object) -> int:
    """Print `message` as one `error:` line on stderr (its own line breaks become `; `); the exit status 2."""
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"error: {text}", file=sys.stderr)
    return 2
