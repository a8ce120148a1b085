"""`python -m convbackends` and the `convbackends` console script (pyproject points here)."""
import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
