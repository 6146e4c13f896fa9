import sys

from ddfast.cli import main

sys.exit(main())
