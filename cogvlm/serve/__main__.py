"""`python -m cogvlm.serve [options]`: the same as `cogvlm serve [options]`."""
from __future__ import annotations

import argparse
import sys

from ..cli import serve as command
from ..cli.options import UsageError, one_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvlm.serve")
    command.add_parser(parser.add_subparsers(dest="command", required=True)).prog = parser.prog
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return command.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except UsageError as e:
        print(f"cogvlm serve: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"cogvlm serve: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
