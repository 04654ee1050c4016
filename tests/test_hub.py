"""`unmask pull` and `unmask list`, run as real subprocesses.

Pulls go to a small server on loopback that speaks the Hub's HTTP protocol (repository info,
file tree, resolve), so the real `huggingface_hub` client downloads real files; an unreachable
or silent Hub must give a one-line error, never a traceback or a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from safetensors import safe_open

from conftest import make_model_dir
from unmask.hub import PACKAGED, RECORD_NAME, check_repo_id, packaged_path, resolve_model, safe_files
from unmask.cli import main
from unmask.errors import UnmaskError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unmask", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})},
    )


def _installed(name: str) -> bool:
    try:
        return packaged_path(name).is_file()
    except UnmaskError:
        return False


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("unmask: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], proc.stderr


class FakeHub(BaseHTTPRequestHandler):
    """The three Hub endpoints a snapshot download uses, serving ``self.server.repos``."""

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.respond(body=False)

    def do_GET(self) -> None:
        self.respond(body=True)

    def respond(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append(path)
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/.*)?)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo_id = (api or resolve).group(1) if (api or resolve) else None
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
        revision = (api.group(3) or "main") if api else resolve.group(2)
        if revision not in ("main", COMMIT):
            return self.send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, body)
        files = repo
        if api and api.group(2) != "tree":
            siblings = [{"rfilename": name, "size": len(data)} for name, data in files.items()]
            return self.send(200, json.dumps({"id": repo_id, "sha": COMMIT, "siblings": siblings}).encode(), {}, body)
        if api:
            tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for n, d in files.items()]
            return self.send(200, json.dumps(tree).encode(), {}, body)
        name = resolve.group(3)
        if name not in files:
            return self.send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}, body)
        data = files[name]
        self.server.downloads.append(name)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self.send(200, data, headers, body, content_type="application/octet-stream")

    def send(self, status: int, data: bytes, headers: dict, body: bool, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer):
    """A loopback Hub holding a tiny model among files a pull must not fetch, and a pickle-only repo."""
    model = make_model_dir(tmp_path_factory.mktemp("hub-model"), tiny_tokenizer)
    files = {f.name: f.read_bytes() for f in model.iterdir()}
    files.update({
        "README.md": b"# tiny\n",
        "chat_template.jinja": b"{{ messages[0]['content'] }}",
        "modeling_tiny.py": b"import os\nos.system('echo pwned')\n",
        "pytorch_model.bin": b"\x80\x04pickled",
        "original/consolidated.safetensors": files["model.safetensors"],
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.repos = {"test-org/tiny": files, "test-org/pickles": {"config.json": b"{}", "pytorch_model.bin": b"\x80"}}
    server.requests, server.downloads = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def hub_env(tmp_path: Path, endpoint: str) -> dict:
    return {
        "UNMASK_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_OFFLINE": "0",
    }


def test_pull_fetches_only_safe_files_and_list_and_load_find_it(tmp_path: Path, hub, tiny_model_dir: Path) -> None:
    env = hub_env(tmp_path, f"http://127.0.0.1:{hub.server_port}")
    proc = run_cli("pull", "test-org/tiny", env=env)
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "home" / "models" / "test-org--tiny"
    assert proc.stdout.strip() == str(target)
    fetched = sorted(p.name for p in target.iterdir())
    assert fetched == sorted([
        "README.md", "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", RECORD_NAME,
    ])
    assert not any(n.endswith((".py", ".bin")) or n.startswith("original") for n in hub.downloads)
    source = hub.repos["test-org/tiny"]
    for name in set(fetched) - {RECORD_NAME}:
        assert (target / name).read_bytes() == source[name]
    assert json.loads((target / RECORD_NAME).read_text())["commit"] == COMMIT
    assert not list((tmp_path / "home" / "models").glob("*.partial"))

    listed = run_cli("list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    entries = {e["name"]: e for e in json.loads(listed.stdout)}
    installed = {n for n in PACKAGED if _installed(n)}  # packaged models appear when their package is there
    assert set(entries) == {"default", "coder-nano-cpu", "coder-nano-cpu-ar", "test-org/tiny", *installed}
    entry = entries["test-org/tiny"]
    with safe_open(str(target / "model.safetensors"), framework="pt") as f:
        elements = sum(f.get_tensor(k).numel() for k in f.keys())
    assert entry["parameters"] == elements
    assert entry["size_bytes"] == sum(p.stat().st_size for p in target.iterdir())
    assert (entry["family"], entry["attention"], entry["status"]) == ("unmask", "bidirectional", "ok")
    assert entry["commit"] == COMMIT and entry["path"] == str(target)

    table = run_cli("list", env={**env, "COLUMNS": "200"})
    assert table.returncode == 0 and "test-org/tiny" in table.stdout and str(target) in table.stdout

    flags = ("--max-new-tokens", "8", "--steps", "4", "--quiet")
    by_name = run_cli("generate", "def add", "--model", "test-org/tiny", *flags, env=env)
    by_path = run_cli("generate", "def add", "--model", str(target), *flags, env=env)
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout == by_path.stdout

    again = run_cli("pull", "test-org/tiny", env=env)
    assert again.returncode == 0 and "up to date" in again.stderr


def test_pull_refuses_a_repository_with_only_pickled_weights(tmp_path: Path, hub) -> None:
    proc = run_cli("pull", "test-org/pickles", env=hub_env(tmp_path, f"http://127.0.0.1:{hub.server_port}"))
    assert_one_line_error(proc, "no safetensors weights", "pytorch_model.bin")
    assert not (tmp_path / "home" / "models").exists()


@pytest.mark.parametrize(
    "args, needle",
    [(("test-org/absent",), "no such model on the Hub"), (("test-org/tiny", "--revision", "v9"), "no revision 'v9'")],
)
def test_pull_names_what_the_hub_does_not_have(tmp_path: Path, hub, args: tuple, needle: str) -> None:
    proc = run_cli("pull", *args, env=hub_env(tmp_path, f"http://127.0.0.1:{hub.server_port}"))
    assert_one_line_error(proc, needle)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_is_a_one_line_error_and_leaves_no_cache_entry(tmp_path: Path) -> None:
    proc = run_cli("pull", "GSAI-ML/LLaDA-8B-Instruct", env=hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}"))
    assert_one_line_error(proc, "cannot reach the Hugging Face Hub", "--model DIR")
    assert not (tmp_path / "home" / "models").exists()


def test_a_hub_that_never_answers_times_out_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = hub_env(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
        proc = run_cli("pull", "GSAI-ML/LLaDA-8B-Instruct", "--timeout", "0.5", env=env)
    assert_one_line_error(proc, "cannot reach the Hugging Face Hub")


def test_offline_mode_is_a_one_line_error(tmp_path: Path) -> None:
    env = {**hub_env(tmp_path, "http://127.0.0.1:9"), "HF_HUB_OFFLINE": "1"}
    assert_one_line_error(run_cli("pull", "GSAI-ML/LLaDA-8B-Instruct", env=env), "HF_HUB_OFFLINE")


def test_real_hub_without_network_fails_with_one_line(tmp_path: Path) -> None:
    try:
        socket.getaddrinfo("huggingface.co", 443)
        pytest.skip("this machine can resolve huggingface.co; the offline path is covered on loopback")
    except OSError:
        pass
    env = {k: v for k, v in hub_env(tmp_path, "").items() if k != "HF_ENDPOINT"}
    proc = run_cli("pull", "GSAI-ML/LLaDA-8B-Instruct", env={**env, "HF_ENDPOINT": "https://huggingface.co"})
    assert_one_line_error(proc, "cannot reach the Hugging Face Hub at https://huggingface.co", "--model DIR")


@pytest.mark.parametrize(
    "repo_id",
    ["llada", "a/b/c", "org/na--me", "../etc/passwd", "org/..", "org/name.git", "org/-name", "org/", "/name",
     "org/name-", "org/na me", "org/" + "x" * 97, "org/name\n"],
)
def test_bad_ids_are_refused(repo_id: str) -> None:
    with pytest.raises(UnmaskError, match="is not a Hugging Face model id"):
        check_repo_id(repo_id)


@pytest.mark.parametrize("repo_id", ["GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B", "a/b", "Qwen/Qwen2.5-0.5B"])
def test_good_ids_pass(repo_id: str) -> None:
    assert check_repo_id(repo_id) == repo_id


def test_bad_id_and_bad_revision_fail_on_the_command_line_before_any_network(capsys) -> None:
    for argv, needle in [(["pull", "org/na--me"], "is not a Hugging Face model id"),
                         (["pull", "org/name", "--revision", "../../x"], "is not a revision")]:
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("unmask: error:") and needle in err


def test_safe_files_keeps_data_and_drops_code_pickles_and_subfolders() -> None:
    names = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer.model", "tokenizer.py", "chat_template.jinja", "README.md", "pytorch_model.bin",
             "model.pt", "modeling_llada.py", "original/model.safetensors", "merges.txt", "vocab.txt", "x.pkl"]
    assert safe_files(names) == sorted(["config.json", "model-00001-of-00002.safetensors",
                                        "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
                                        "chat_template.jinja", "README.md", "merges.txt", "vocab.txt"])


def test_resolve_model_prefers_a_directory_then_the_cache(tmp_path: Path, monkeypatch, tiny_model_dir: Path) -> None:
    monkeypatch.setenv("UNMASK_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "models" / "me--tiny"
    cached.mkdir(parents=True)
    assert resolve_model("me/tiny") == cached
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    assert resolve_model("default").name == "default"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me" / "tiny").mkdir(parents=True)
    assert resolve_model("me/tiny") == Path("me/tiny")  # a directory of that name wins
    (tmp_path / "home" / "models" / "me--half.partial").mkdir()
    for name, needle in [("me/half", "incomplete"), ("me/absent", "unmask pull me/absent"),
                         ("../escape", "model directory not found")]:
        with pytest.raises(UnmaskError, match=needle):
            resolve_model(name)


def test_list_flags_an_unfinished_download(tmp_path: Path, tiny_model_dir: Path, monkeypatch, capsys) -> None:
    partial = tmp_path / "home" / "models" / "org--half.partial"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    monkeypatch.setenv("UNMASK_HOME", str(tmp_path / "home"))
    assert main(["list", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["org/half"]["status"].startswith("incomplete download")
    assert entries["default"]["status"] == "ok" and entries["default"]["parameters"] > 0


def test_list_reads_weights_and_config_with_the_shared_readers(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A truncated weights file is flagged (its header alone looks fine), and a config.json that is not a
    regular file is refused at once instead of blocking the listing."""
    from unmask.hub import describe

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    fifo = tmp_path / "fifo"
    shutil.copytree(tiny_model_dir, fifo)
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")

    found: dict[str, object] = {}
    worker = threading.Thread(target=lambda: found.update(t=describe(truncated, "t"), f=describe(fifo, "f")), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "describe() blocked on a FIFO named config.json"
    assert found["t"].parameters is None and str(weights) in found["t"].status, found["t"]
    assert "\n" not in found["t"].status
    assert found["f"].status == f"{fifo / 'config.json'}: not a regular file (a FIFO)", found["f"]
    assert describe(tiny_model_dir, "ok").status == "ok"
