import sys

from clv.cli import main

sys.exit(main())
