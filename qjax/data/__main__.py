"""CLI: `python -m qjax.data fetch NAME [--cache-dir DIR] [--source PATH]`."""

from __future__ import annotations

import argparse
import sys

from qjax.data import fetching
from qjax.data import registry


def main(argv: list[str] | None = None) -> int:
  """Parses the command line and fetches; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m qjax.data")
  commands = parser.add_subparsers(dest="command", required=True)
  fetch = commands.add_parser("fetch",
                              help="fill the cache with verified files")
  fetch.add_argument("name", choices=registry.KNOWN_NAMES)
  fetch.add_argument("--cache-dir", default=None,
                     help="cache root (default: $QJAX_DATA or "
                     "~/.cache/qjax/datasets)")
  fetch.add_argument("--source", default=None,
                     help="local directory of files or CIFAR .tar.gz to import")
  args = parser.parse_args(argv)
  try:
    path = fetching.fetch(args.name, args.cache_dir, source=args.source)
  except fetching.FetchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
