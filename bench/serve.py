"""The serving benchmark as a script: `python bench/serve.py [--quick]` is `lorakit bench serve [--quick]`."""

import sys

from lorakit.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "serve", *sys.argv[1:]]))
