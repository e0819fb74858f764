import sys

from fmrilm.cli import main

sys.exit(main())
