"""`effqat push LOCAL_DIR --repo-id USER/NAME`: upload a checkpoint folder with a generated model card."""
from __future__ import annotations

import argparse
import json
import logging


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face Hub with a model card",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p) -> None:
    p.add_argument("local_dir", help="checkpoint folder (fp, EQAT, GPTQ or BitBLAS)")
    p.add_argument("--repo-id", required=True, help="USER/NAME of the hub repository (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if needed); default main")
    p.add_argument("--dry-run", action="store_true", help="print the file list, sizes and the card; no network")
    p.add_argument("--base-model", default=None,
                   help="hub id (or local folder) of the model that was quantized; default: from the folder")
    p.add_argument("--license", default=None, help="license id for the card; default: the base model's")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--endpoint", default=None, help="hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--token", default=None, help="access token (default: HF_TOKEN or the saved login)")
    p.add_argument("--write-card", action="store_true", help="also save the generated README.md into LOCAL_DIR")


def run(args) -> int:
    from effqat_plugin.hub import push
    from effqat_plugin.model_card import write_card

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = push(args.local_dir, args.repo_id, private=args.private, revision=args.revision,
                  dry_run=args.dry_run, token=args.token, endpoint=args.endpoint,
                  commit_message=args.commit_message, base_model=args.base_model, license=args.license)
    if args.write_card:
        write_card(args.local_dir, report["card"])
    if args.dry_run:
        print(report["description"])
        print()
        print("----- README.md (model card) -----")
        print(report["card"])
        return 0
    print(json.dumps({k: report[k] for k in ("repo_id", "commit_oid", "commit_url", "files", "bytes")}))
    return 0
