import sys

from img2prompt.cli import main

sys.exit(main())
