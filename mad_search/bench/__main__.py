"""``python -m mad_search.bench NAME [key=value ...]``: run one benchmark."""

import sys

from mad_search.bench import main

if __name__ == "__main__":
    sys.exit(main())
