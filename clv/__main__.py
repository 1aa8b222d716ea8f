import sys

from clv._start import main

sys.exit(main())
