"""Push a checkpoint folder to the Hugging Face Hub: file selection, checkpoint check, one commit.

    push(folder, "user/name", private=False, revision=None, dry_run=False) -> dict

What goes up is decided here, not by the folder's contents alone:

* the folder must be a loadable checkpoint (:func:`check_checkpoint`: ``config.json`` with a
  ``model_type``, readable safetensors shards that match their index, a tokenizer, and for quantized
  folders a format our converters can plan, i.e. bits / group / layout that a loader can read);
* only checkpoint files are selected (weights, configs, tokenizer, license, our eval JSON and
  plots); secrets (``.env``, ``*.token``, keys, credentials, netrc ...), hidden files and folders,
  temporary / partial outputs (``.tmp-`` folders of our atomic writers, ``*.tmp``, ``*.partial``,
  ``*.incomplete``, lock files) and pickles are never uploaded, and small text files that contain
  something shaped like a Hugging Face token stop the push;
* the model card (``README.md``) is generated (:mod:`effqat_plugin.model_card`) and replaces any
  local README.

Everything is sent as one ``create_commit`` (LFS / Xet files are pre-uploaded in parallel by
``huggingface_hub`` before the commit), after ``create_repo(exist_ok=True)`` and, for a
``revision`` other than ``main``, ``create_branch(exist_ok=True)``. ``dry_run`` touches no network.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .jsonio import STAGE_MARKER

log = logging.getLogger("effqat.hub")

EVAL_JSON = "effqat_eval.json"

# Files a checkpoint repository is made of (matched against the path relative to the folder).
ALLOWED = (
    "*.safetensors", "*.safetensors.index.json",
    "config.json", "generation_config.json", "quantize_config.json", "quant_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "*.tiktoken",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "LICENSE", "LICENSE.*", "LICENSE-*", "NOTICE", "USE_POLICY.md",
    EVAL_JSON, "quality_table.json", "*.png",
)
# Never uploaded, whatever the allow list says (checked first, on every path component).
SECRET = (
    ".env", ".env.*", "*.env", "*.token", "token", "*token*.txt", "*token*.json", ".netrc", "_netrc",
    "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*", "*credentials*",
    "*secret*", ".git-credentials", ".npmrc", ".pypirc", "*.kdbx",
)
TEMP = (
    "*.tmp", "*.temp", "*.partial", "*.part", "*.incomplete", "*.lock", "*.swp", "*~", "*.bak",
    "*.tmp-*", "*.old-*", "tmp*", "__pycache__", "*.pyc", ".DS_Store", ".ipynb_checkpoints",
)
PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
# tokenizer files are allowed although "token" is in their name
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json"}

HF_TOKEN_RE = re.compile(rb"\bhf_[A-Za-z0-9]{30,}\b")
SCAN_MAX_BYTES = 4 << 20  # text files scanned for tokens (configs, tokenizers, JSON reports)
MAX_FILE_BYTES = 50 * 10**9  # the hub refuses single files above 50 GB


@dataclass
class FileEntry:
    path: str  # relative, POSIX
    abspath: str
    size: int


@dataclass
class Selection:
    files: List[FileEntry] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class CheckpointInfo:
    kind: str  # "fp" | "quantized"
    model_type: str
    fmt: Optional[str] = None  # eqat | gptq | gptq_v2 | bitblas
    bits: Optional[int] = None
    group_size: Optional[int] = None
    shards: List[str] = field(default_factory=list)
    quantize_config: Optional[dict] = None
    config: dict = field(default_factory=dict)


def _match(name: str, patterns) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


def classify(rel: str) -> Optional[str]:
    """Why ``rel`` (path relative to the folder) is not uploaded, or None when it is."""
    parts = rel.split("/")
    for part in parts:
        if part in TOKENIZER_FILES:
            continue
        if _match(part, SECRET):
            return "secret"
    for part in parts:
        if _match(part, TEMP):
            return "temporary"
    if any(p.startswith(".") for p in parts):
        return "hidden"
    name = parts[-1]
    if _match(name, PICKLES):
        return "pickle (only safetensors weights are uploaded)"
    if name == "README.md" and len(parts) == 1:
        return "replaced by the generated model card"
    if len(parts) > 1 and not name.endswith(".png"):
        return "not a checkpoint file (sub-folder)"
    if not _match(name, ALLOWED):
        return "not a checkpoint file"
    return None


def select_files(folder) -> Selection:
    """Walk ``folder`` (symlinks not followed) and split it into files to upload and skipped ones."""
    folder = Path(folder)
    sel = Selection()
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel_root = Path(root).relative_to(folder).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        keep_dirs = []
        for d in sorted(dirs):
            why = classify(rel_root + d + "/x.png")  # a folder is judged by its own name
            if why in ("secret", "temporary", "hidden"):
                sel.skipped.append((rel_root + d + "/", why))
            else:
                keep_dirs.append(d)
        dirs[:] = keep_dirs
        for name in sorted(files):
            rel = rel_root + name
            p = Path(root) / name
            if p.is_symlink():
                sel.skipped.append((rel, "symbolic link"))
                continue
            why = classify(rel)
            if why:
                sel.skipped.append((rel, why))
                continue
            sel.files.append(FileEntry(rel, str(p), p.stat().st_size))
    sel.files.sort(key=lambda f: f.path)
    return sel


def scan_for_tokens(sel: Selection) -> None:
    """Refuse to push a small text file that holds something shaped like a Hugging Face token."""
    for f in sel.files:
        if f.path.endswith((".safetensors", ".png")) or f.size > SCAN_MAX_BYTES:
            continue
        with open(f.abspath, "rb") as fh:
            if HF_TOKEN_RE.search(fh.read()):
                raise ValueError(f"{f.path} contains what looks like a Hugging Face access token; "
                                 "remove it before pushing")


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def check_checkpoint(folder) -> CheckpointInfo:
    """Cheap (metadata only) check that ``folder`` is a checkpoint a loader can open; raises ValueError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    cfg = _read_json(folder / "config.json")
    if not cfg or not cfg.get("model_type"):
        raise ValueError(f"{folder} is not a loadable checkpoint: config.json with a model_type is missing")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{folder} is not a loadable checkpoint: no *.safetensors weights")
    index = _read_json(folder / "model.safetensors.index.json")
    if index is not None:
        wanted = set((index.get("weight_map") or {}).values())
        missing = sorted(wanted - set(shards))
        if missing:
            raise ValueError(f"{folder}: incomplete checkpoint, shards listed in the index are missing: {missing[:4]}")
    from safetensors import safe_open

    for name in shards:
        try:
            with safe_open(str(folder / name), "pt") as f:
                f.keys()
        except Exception as e:  # truncated / partial shard
            raise ValueError(f"{folder}/{name} is not a readable safetensors file ({e})") from None
    has_tok = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                                     "spiece.model", "tokenizer_config.json"))
    if not has_tok:
        raise ValueError(f"{folder} is not a loadable checkpoint: no tokenizer files (GPTQModel.load needs one)")
    info = CheckpointInfo(kind="fp", model_type=cfg["model_type"], shards=shards, config=cfg)
    from .loading import is_quantized_folder

    if is_quantized_folder(str(folder)):
        from .converters import plan_folder

        try:
            plan = plan_folder(folder)
        except Exception as e:
            raise ValueError(f"{folder} is not a loadable quantized checkpoint: {e}") from None
        try:
            info.kind, info.fmt, info.bits, info.group_size = "quantized", plan.fmt.name, plan.bits, plan.group_size
            info.quantize_config = plan.qcfg
        finally:
            plan.folder.close()
    return info


def is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not os.path.exists(name)


def base_model_id(base: str) -> str:
    """The hub id to put in the card's ``base_model`` for a hub id or a local base folder."""
    if not os.path.isdir(base):
        return base
    cfg = _read_json(Path(base) / "config.json") or {}
    guess = cfg.get("_name_or_path")
    if isinstance(guess, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", guess) and not os.path.exists(guess):
        return guess
    name = Path(base).resolve().name
    log.warning("base model %s is a local folder with no hub id; the card says base_model: %s "
                "(pass --base-model USER/NAME to link the hub model)", base, name)
    return name


def read_stage_marker(folder) -> dict:
    return _read_json(Path(folder) / STAGE_MARKER) or {}


@dataclass
class PushPlan:
    folder: str
    repo_id: str
    info: CheckpointInfo
    selection: Selection
    card: str
    extra_files: Dict[str, str] = field(default_factory=dict)  # path in repo -> local file (e.g. base LICENSE)

    def describe(self) -> str:
        lines = [f"push {self.folder} -> {self.repo_id} ({self.info.kind}"
                 + (f", {self.info.fmt} w{self.info.bits}g{self.info.group_size}" if self.info.fmt else "") + ")"]
        lines.append("files:")
        for f in self.selection.files:
            lines.append(f"  {f.size:>14,d}  {f.path}")
        for rel, src in self.extra_files.items():
            lines.append(f"  {os.path.getsize(src):>14,d}  {rel}  (from {src})")
        lines.append(f"  {len(self.card.encode()):>14,d}  README.md  (generated model card)")
        total = self.selection.total_bytes + sum(os.path.getsize(s) for s in self.extra_files.values()) \
            + len(self.card.encode())
        lines.append(f"total {total:,d} bytes in {len(self.selection.files) + len(self.extra_files) + 1} files")
        if self.selection.skipped:
            lines.append("not uploaded:")
            for rel, why in self.selection.skipped:
                lines.append(f"  {rel}  ({why})")
        return "\n".join(lines)


def plan_push(folder, repo_id: str, base_model: Optional[str] = None, license: Optional[str] = None,
              extra_card: Optional[dict] = None) -> PushPlan:
    """Check the folder, select its files and write the card; no network."""
    from .model_card import CardInputs, render_card, base_license

    if not is_hub_id(repo_id) and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id or ""):
        raise ValueError(f"--repo-id must look like USER/NAME, got {repo_id!r}")
    folder = str(folder)
    info = check_checkpoint(folder)
    sel = select_files(folder)
    scan_for_tokens(sel)
    big = [f for f in sel.files if f.size > MAX_FILE_BYTES]
    if big:
        raise ValueError(f"{big[0].path} is {big[0].size:,d} bytes; the hub takes at most 50 GB per file "
                         "(re-save with a smaller max_shard_size)")
    marker = read_stage_marker(folder)
    recorded = ((info.quantize_config or {}).get("meta") or {}).get("eqat") or {}
    base = (base_model or marker.get("base_model") or recorded.get("base_model")
            or info.config.get("_name_or_path") or None)
    extra = {}
    lic, lic_file = base_license(base) if base else (None, None)
    if lic_file and not any(f.path.upper().startswith("LICENSE") for f in sel.files):
        extra[os.path.basename(lic_file)] = lic_file
    base_id = base_model_id(base) if base else None
    inputs = CardInputs(folder=folder, repo_id=repo_id, info=info, base_model=base_id,
                        license=license or lic, marker=marker,
                        files=sorted([f.path for f in sel.files] + list(extra) + ["README.md"]),
                        extra=extra_card or {})
    card = render_card(inputs)
    return PushPlan(folder=folder, repo_id=repo_id, info=info, selection=sel, card=card, extra_files=extra)


def push(folder, repo_id: str, *, private: bool = False, revision: Optional[str] = None, dry_run: bool = False,
         token: Optional[str] = None, endpoint: Optional[str] = None, commit_message: Optional[str] = None,
         base_model: Optional[str] = None, license: Optional[str] = None, extra_card: Optional[dict] = None,
         num_threads: int = 5) -> dict:
    """Upload ``folder`` as one commit to ``repo_id``; returns a report (with ``card`` and ``files``)."""
    plan = plan_push(folder, repo_id, base_model=base_model, license=license, extra_card=extra_card)
    report = {"repo_id": repo_id, "folder": plan.folder, "kind": plan.info.kind, "format": plan.info.fmt,
              "files": [f.path for f in plan.selection.files] + sorted(plan.extra_files) + ["README.md"],
              "bytes": plan.selection.total_bytes, "skipped": plan.selection.skipped, "card": plan.card,
              "dry_run": dry_run, "description": plan.describe()}
    if dry_run:
        return report
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.is_offline_mode():
        raise ValueError("HF_HUB_OFFLINE is set: the hub cannot be reached; unset it (or use --dry-run)")
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.abspath) for f in plan.selection.files]
    ops += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src) for rel, src in plan.extra_files.items()]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode("utf-8")))
    n = len(ops)
    if n > 1000:
        log.warning("%d files in one commit; the hub handles it but consider larger shards", n)
    log.info("uploading %d files (%s bytes) to %s%s", n, f"{plan.selection.total_bytes:,d}", repo_id,
             f"@{revision}" if revision else "")
    info = api.create_commit(
        repo_id=repo_id, operations=ops, repo_type="model", revision=revision, num_threads=num_threads,
        commit_message=commit_message or f"Upload {plan.info.fmt or 'fp'} checkpoint with effqat",
        commit_description=f"{n} files, {plan.selection.total_bytes:,d} bytes, pushed by `effqat push`.")
    report.update(commit_oid=info.oid, commit_url=info.commit_url, repo_url=str(repo_url))
    return report
