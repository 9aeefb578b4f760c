import sys

from starlora.cli import main

sys.exit(main())
