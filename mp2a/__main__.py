import sys

from mp2a.cli import main

sys.exit(main())
