import sys

from predet.cli import main

sys.exit(main())
