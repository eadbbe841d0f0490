"""Sub-commands of the ``effqat`` console script; each module has ``add_parser(subparsers)``."""
