"""`effqat push` against a local stand-in for the hub API (no network): card, file list, one commit.

``FakeHub`` implements just what huggingface_hub 2.4's ``HfApi(endpoint=...)`` calls for
``create_repo`` / ``create_branch`` / ``create_commit``: repo create, branch create, README YAML
validation, preupload (files above ``lfs_threshold`` go LFS), the LFS batch API with a basic PUT
transfer (sha256 checked), and the NDJSON commit. It records every request.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from effqat_plugin import hub


class FakeHub:
    def __init__(self, lfs_threshold: int = 100_000):
        self.lfs_threshold = lfs_threshold
        self.requests = []  # (method, path, headers, body bytes)
        self.repos = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs = {}  # oid -> bytes
        self.commits = []  # {"repo_id", "revision", "header", "ops"}
        self.lock = threading.Lock()
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, code, obj=None, headers=None):
                data = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_GET(self):
                self._handle("GET")

            def _handle(self, method):
                body = self._body()
                path = urlsplit(self.path).path
                with hub_.lock:
                    hub_.requests.append((method, path, {k.lower(): v for k, v in self.headers.items()}, body))
                    try:
                        code, obj, hdrs = hub_.route(method, path, body, self.headers)
                    except Exception as e:  # a bug in the stand-in must show up as a failure
                        code, obj, hdrs = 500, {"error": repr(e)}, {}
                self._send(code, obj, hdrs)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # --- the API ---------------------------------------------------------------------------
    def route(self, method, path, body, headers):
        parts = path.strip("/").split("/")
        not_found = (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            assert req.get("type", "model") == "model"
            rid = f"{req['organization']}/{req['name']}"
            if rid in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{rid}"}, {}
            self.repos[rid] = {"private": req.get("visibility") == "private", "branches": {"main": {}}}
            return 200, {"url": f"{self.url}/{rid}"}, {}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if method == "POST" and parts[:2] == ["api", "models"] and len(parts) >= 6:
            rid, action, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            repo = self.repos.get(rid)
            if repo is None:
                return not_found
            if action == "branch":
                if rev in repo["branches"]:
                    return 409, {"error": "Reference already exists"}, {}
                repo["branches"][rev] = dict(repo["branches"]["main"])
                return 200, {}, {}
            if rev not in repo["branches"]:
                return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                        "uploadMode": "lfs" if f["size"] > self.lfs_threshold else "regular"}
                                       for f in files]}, {}
            if action == "commit":
                lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                header = lines[0]
                assert header["key"] == "header"
                ops, tree = lines[1:], repo["branches"][rev]
                for op in ops:
                    v = op["value"]
                    if op["key"] == "file":
                        tree[v["path"]] = base64.b64decode(v["content"])
                    elif op["key"] == "lfsFile":
                        if v["oid"] not in self.lfs:
                            return 422, {"error": f"LFS object {v['oid']} was not uploaded"}, {}
                        tree[v["path"]] = self.lfs[v["oid"]]
                    else:
                        return 400, {"error": f"unexpected op {op['key']}"}, {}
                oid = uuid.uuid4().hex + "00000000"
                self.commits.append({"repo_id": rid, "revision": rev, "header": header["value"], "ops": ops,
                                     "oid": oid})
                return 200, {"commitUrl": f"{self.url}/{rid}/commit/{oid}", "commitOid": oid,
                             "success": True}, {}
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            req = json.loads(body)
            assert req["operation"] == "upload"
            return 200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{self.url}/__lfs/{o['oid']}"}}} for o in req["objects"]]}, {}
        if method == "PUT" and parts[0] == "__lfs":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return 400, {"error": "sha256 mismatch"}, {}
            self.lfs[parts[1]] = body
            return 200, {}, {}
        return 404, {"error": f"no route {method} {path}"}, {}


@pytest.fixture()
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline; this hub is local
    # hf_xet (installed with huggingface_hub) would send LFS data to a Xet CAS; the stand-in speaks the
    # classic LFS batch API, which is what huggingface_hub uses when hf_xet is absent
    monkeypatch.setattr("huggingface_hub._commit_api.is_xet_available", lambda: False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    h = FakeHub().start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def qfolder(tmp_path_factory, stories260k_dir):
    """Quantized folder via `effqat quantize` with tiny settings (a real EQAT meta in quantize_config)."""
    from effqat_plugin.cli import main

    root = tmp_path_factory.mktemp("hubq")
    out = root / "stories260k-EfficientQAT-w2g64"
    rc = main(["quantize", str(stories260k_dir), str(out), "--n-samples", "16", "--seq-len", "32",
               "--block-epochs", "1", "--e2e-epochs", "1", "--quiet", "--device", "cpu"])
    assert rc == 0
    return out


def polluted_copy(src, dst):
    """The checkpoint plus everything that must never be uploaded."""
    shutil.copytree(src, dst)
    (dst / ".env").write_text("HF_TOKEN=hf_" + "a" * 34 + "\n")
    (dst / "hf.token").write_text("hf_" + "b" * 34)
    (dst / "my_secret.json").write_text("{}")
    (dst / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (dst / "notes.tmp").write_text("scratch")
    (dst / "model.safetensors.partial").write_bytes(b"\0" * 10)
    (dst / "pytorch_model.bin").write_bytes(b"\0" * 10)
    (dst / "README.md").write_text("# stale local readme\n")
    (dst / ".effqat_stage.json").write_text(json.dumps({"base_model": "karpathy/tinyllamas",
                                                        "calibration": "samples.safetensors"}))
    tmpdir = dst / f".{dst.name}.tmp-abc123"
    tmpdir.mkdir()
    (tmpdir / "model.safetensors").write_bytes(b"\0" * 10)
    (dst / ".git").mkdir()
    (dst / ".git" / "config").write_text("[core]")
    (dst / ".cache").mkdir()
    (dst / ".cache" / "x.lock").write_text("")
    return dst


EXPECTED = {"README.md", "config.json", "generation_config.json", "model.safetensors", "quantize_config.json",
            "tokenizer.json", "tokenizer_config.json"}


def test_select_files_keeps_checkpoint_drops_secrets_and_temp(tmp_path, qfolder):
    d = polluted_copy(qfolder, tmp_path / "ck")
    sel = hub.select_files(d)
    assert {f.path for f in sel.files} == EXPECTED - {"README.md"}
    skipped = dict(sel.skipped)
    for secret in (".env", "hf.token", "my_secret.json", "id_rsa"):
        assert skipped[secret] == "secret"
    assert skipped["notes.tmp"] == "temporary"
    assert skipped["model.safetensors.partial"] == "temporary"
    assert skipped[f".{d.name}.tmp-abc123/"] == "temporary"
    assert skipped[".git/"] == "hidden" and skipped[".effqat_stage.json"] == "hidden"
    assert "pickle" in skipped["pytorch_model.bin"]
    assert "model card" in skipped["README.md"]


def test_token_in_text_file_stops_push(tmp_path, qfolder):
    d = tmp_path / "ck"
    shutil.copytree(qfolder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["note"] = "hf_" + "Z" * 36
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="access token"):
        hub.plan_push(d, "me/x")


@pytest.mark.parametrize("breakage, message", [
    ("no_config", "config.json"),
    ("no_weights", "safetensors"),
    ("truncated", "not a readable safetensors"),
    ("no_tokenizer", "tokenizer"),
    ("index_missing_shard", "missing"),
])
def test_refuses_folders_that_are_not_loadable(tmp_path, qfolder, breakage, message):
    d = tmp_path / "ck"
    shutil.copytree(qfolder, d)
    if breakage == "no_config":
        (d / "config.json").unlink()
    elif breakage == "no_weights":
        (d / "model.safetensors").unlink()
    elif breakage == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif breakage == "no_tokenizer":
        (d / "tokenizer.json").unlink()
        (d / "tokenizer_config.json").unlink()
    elif breakage == "index_missing_shard":
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        hub.plan_push(d, "me/x")


def test_card_front_matter_and_content(qfolder, stories260k_dir):
    from effqat_plugin.model_card import front_matter

    plan = hub.plan_push(qfolder, "me/stories260k-EfficientQAT-w2g64", base_model=str(stories260k_dir))
    fm = front_matter(plan.card)
    assert fm["library_name"] == "gptqmodel"
    assert fm["base_model"] == "stories260k"
    assert fm["license"] == "mit"  # from the base folder's LICENSE text
    assert {"quantization", "efficientqat", "gptq"} <= set(fm["tags"])
    assert "LICENSE" in plan.extra_files  # the base's license travels with the weights
    card = plan.card
    assert "2-bit weights with group size 64" in card
    assert 'GPTQModel.load("me/stories260k-EfficientQAT-w2g64")' in card
    assert "| Block-AP | 1 epoch(s), batch 2" in card
    assert "(lr scale by held-out loss: layer 0 32/64/128 -> " in card  # the auto preset's lr search
    assert "| calibration data | 14 train + 2 validation sequences of 32 tokens" in card
    assert card.count("| 4 |") >= 1 and "## Block-AP per-layer loss" in card
    # the shipped reference comparison at the checkpoint's own bits / group size (w2g64)
    ref = json.loads(REFERENCE.read_text())
    eqat = next(r for r in ref["configs"]["w2g64"] if r["method"] == "eqat")
    assert "## EfficientQAT against GPTQ and AutoRound (reference, not this model)" in card
    assert f"| {eqat['label']} | {eqat['ppl']['test']:,.2f} |" in card and "at w2g64" in card
    # a hub id given explicitly wins, and an explicit license overrides
    plan2 = hub.plan_push(qfolder, "me/x", base_model="karpathy/tinyllamas", license="apache-2.0")
    fm2 = front_matter(plan2.card)
    assert fm2["base_model"] == "karpathy/tinyllamas" and fm2["license"] == "apache-2.0"


REFERENCE = Path(__file__).resolve().parents[1] / "effqat_plugin" / "assets" / "reference_quality.json"


def test_card_reference_section_only_for_measured_configs(tmp_path):
    """The card quotes the benchmark table for the checkpoint's config only, fp first, methods in the
    table's order with their CPU-time ratio to GPTQ; nothing for a config the table lacks or a
    missing / corrupt table."""
    from effqat_plugin.model_card import reference_section

    table = {"made_by": "bench", "model": "m", "calibration": "4 x 8 tokens of a.txt",
             "evaluation": {"test": "2 x 8 tokens of b.txt", "kjv": "1 x 8 tokens of c.txt"},
             "fp": {"test": 10.0, "kjv": 12.5},
             "configs": {"w3g128": [{"method": "gptq", "label": "GPTQ", "ppl": {"test": 30.0, "kjv": 1234.5},
                                     "cpu_time_vs_gptq": 1.0},
                                    {"method": "eqat", "label": "EQAT", "ppl": {"test": 11.0},
                                     "cpu_time_vs_gptq": 7.5}]}}
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(table))
    lines = reference_section(3, 128, path)
    rows = [ln for ln in lines if ln.startswith("| ")]
    assert rows == ["| method | test ppl | kjv ppl | quantization CPU time / GPTQ |",
                    "| fp32 (unquantized) | 10.00 | 12.50 | - |", "| GPTQ | 30.00 | 1,234.50 | 1.00x |",
                    "| EQAT | 11.00 | - | 7.50x |"]
    assert "at w3g128" in lines[2] and "test (2 x 8 tokens of b.txt)" in lines[2]
    assert reference_section(2, 64, path) == []
    path.write_text("{not json")
    assert reference_section(3, 128, path) == [] and reference_section(3, 128, tmp_path / "none.json") == []
    shipped = json.loads(REFERENCE.read_text())
    assert {"w2g64", "w3g128", "w4g128"} <= set(shipped["configs"]) and shipped["fp"]["test"] > 0


def test_push_sends_one_commit_with_card_and_only_checkpoint_files(tmp_path, qfolder, fake_hub):
    d = polluted_copy(qfolder, tmp_path / "stories260k-EfficientQAT-w2g64")
    rep = hub.push(d, "me/tiny-w2g64", private=True, endpoint=fake_hub.url, token="hf_testtoken")
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["repo_id"] == "me/tiny-w2g64" and commit["revision"] == "main"
    assert rep["commit_oid"] == commit["oid"]
    repo = fake_hub.repos["me/tiny-w2g64"]
    assert repo["private"] is True
    tree = repo["branches"]["main"]
    assert set(tree) == EXPECTED
    for name in EXPECTED - {"README.md"}:
        assert tree[name] == (d / name).read_bytes(), name
    # the safetensors went through LFS (over the threshold), the configs as regular files
    kinds = {op["value"]["path"]: op["key"] for op in commit["ops"]}
    assert kinds["model.safetensors"] == "lfsFile" and kinds["config.json"] == "file"
    card = tree["README.md"].decode()
    assert card.startswith("---\n") and "library_name: gptqmodel" in card
    assert "base_model: karpathy/tinyllamas" in card  # from the pipeline's stage marker
    assert "samples.safetensors" in card
    assert "stale local readme" not in card
    for secret in (b"hf_aaaa", b"hf_bbbb", b"OPENSSH"):
        assert all(secret not in v for v in tree.values())
    # the token went in the Authorization header of every API call
    api_calls = [r for r in fake_hub.requests if r[1].startswith("/api/")]
    assert api_calls and all(r[2].get("authorization") == "Bearer hf_testtoken" for r in api_calls)


def test_push_existing_repo_to_a_branch(tmp_path, qfolder, fake_hub):
    fake_hub.repos["me/tiny"] = {"private": False, "branches": {"main": {"old.txt": b"x"}}}
    rep = hub.push(qfolder, "me/tiny", revision="w2g64-v1", endpoint=fake_hub.url, token="hf_t")
    assert fake_hub.commits[-1]["revision"] == "w2g64-v1"
    assert "README.md" in fake_hub.repos["me/tiny"]["branches"]["w2g64-v1"]
    assert fake_hub.repos["me/tiny"]["branches"]["main"] == {"old.txt": b"x"}
    assert rep["commit_url"].endswith(rep["commit_oid"])
    # pushing again to the same (now existing) branch also works
    hub.push(qfolder, "me/tiny", revision="w2g64-v1", endpoint=fake_hub.url, token="hf_t")
    assert len(fake_hub.commits) == 2


def test_cli_dry_run_prints_files_and_card_without_network(qfolder, capsys, monkeypatch):
    from effqat_plugin.cli import main

    def no_network(*a, **k):
        raise AssertionError("dry run must not create an HfApi")

    monkeypatch.setattr("huggingface_hub.HfApi", no_network)
    assert main(["push", str(qfolder), "--repo-id", "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "README.md  (generated model card)" in out
    assert "library_name: gptqmodel" in out and "---" in out
    assert f"{(qfolder / 'model.safetensors').stat().st_size:,d}" in out


def test_cli_errors_exit_2(tmp_path, capsys):
    from effqat_plugin.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), "--repo-id", "me/x", "--dry-run"]) == 2
    assert "not a loadable checkpoint" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nope"), "--repo-id", "me/x", "--dry-run"]) == 2


def test_script_form_dry_run(qfolder):
    r = subprocess.run([sys.executable, "scripts/push_to_hub.py", str(qfolder), "--repo-id", "me/x", "--dry-run",
                        "--base-model", "karpathy/tinyllamas"], capture_output=True, text=True, cwd=str(hub.Path(__file__).resolve().parents[1]), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "generated model card" in r.stdout and "base_model_relation: quantized" in r.stdout
