"""`python -m jaxeff.run name=<experiment> [preset=smoke|full] [resume=true] [key=value ...]`."""

import sys

from jaxeff.experiment import main

if __name__ == "__main__":
    sys.exit(main())
