"""The ``vertebral-labeling`` command line: label, evaluate, train, phantom.

One file per part registers its subcommands: ``mri`` (label, evaluate, train, export-onnx,
phantom, stress), ``xray`` (xray ...) and ``study`` (batch, study-report, qc-serve,
import-corrections).  Errors the user can fix (bad image, missing model, existing output) print
one line and exit with status 2; outputs are written only after labeling succeeded, each one
atomically.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import VertebralLabelingError
from . import mri, study, xray


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vertebral-labeling", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for part in (mri, xray, study):
        part.register(sub)  # each sets its own ``handler`` default on its parsers
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except VertebralLabelingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file system failure no command checked for: one line, not a traceback
        where = f" {error.filename}" if error.filename else ""
        print(f"error: cannot read or write{where}: {error.strerror or error}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (the input is too large for this machine)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
