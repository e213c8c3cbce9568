import sys

from fastssl.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
