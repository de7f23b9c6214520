"""``python -m loraformat_toyarch DIR``: write a tiny toymlp checkpoint into DIR."""

import sys

from .checkpoint import write_checkpoint

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m loraformat_toyarch DIR")
    print(write_checkpoint(sys.argv[1]))
