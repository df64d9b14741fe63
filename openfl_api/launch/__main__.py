"""``python -m openfl_api.launch``: run the launcher on this command line and exit with its code."""

import sys

from openfl_api.launch import main

if __name__ == "__main__":
    sys.exit(main())
