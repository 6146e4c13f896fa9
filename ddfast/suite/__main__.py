import sys

from ddfast.suite.cli import main

sys.exit(main())
