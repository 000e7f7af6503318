import sys

from loopformer.cli import main

sys.exit(main())
