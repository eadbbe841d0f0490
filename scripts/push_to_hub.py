"""Push a checkpoint folder to the Hugging Face Hub with a generated model card.

Same as `effqat push`:

    python scripts/push_to_hub.py LOCAL_DIR --repo-id USER/NAME [--private] [--revision BRANCH] [--dry-run]
"""
from __future__ import annotations

import argparse
import sys

from effqat_plugin.env import prepare_runtime_env


def main(argv=None) -> int:
    prepare_runtime_env()
    from effqat_plugin.commands import push

    ap = argparse.ArgumentParser(prog="push_to_hub.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    push.add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return push.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"push_to_hub: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
