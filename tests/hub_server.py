"""A fake Hugging Face Hub on 127.0.0.1 for huggingface_hub's own download and upload functions (no network).

Endpoints and headers follow huggingface_hub 2.4's client code (``file_download.get_hf_file_metadata``,
``HfApi.repo_info`` / ``list_repo_tree`` / ``create_repo`` / ``create_branch``, ``_commit_api``):

* ``HEAD|GET /{repo}/resolve/{revision}/{file}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1), ``Content-Length``.
  Large-file-style entries (``*.safetensors``, stored as LFS on the Hub) answer 302 to ``http://localhost:PORT/lfs/
  <sha256>`` with ``X-Linked-Etag`` / ``X-Linked-Size``: another origin than the ``127.0.0.1`` endpoint, so, as
  with the Hub's CDN, the client reads the metadata from the redirect itself and GETs the file there.
* ``GET /api/models/{repo}[/revision/{rev}]`` (``sha``, ``siblings``), ``GET /api/models/{repo}/tree/{rev}``.
* 404s carry ``X-Error-Code``: ``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``.
* Uploads: ``POST /api/validate-yaml`` (README metadata), ``/api/repos/create``, ``/api/models/{repo}/branch/{b}``, ``/preupload/{rev}`` (every file
  "regular", so the commit carries them inline) and ``/commit/{rev}`` (ndjson) make a new commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LARGE_SUFFIXES = (".safetensors", ".bin")


def blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag -> sha


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._lock = threading.Lock()
        self._n = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- repository content ---------------------------------------------------------------------------------
    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", keep: bool = True) -> str:
        """A new commit on ``branch`` holding ``files`` (plus the branch's previous files when ``keep``)."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            self._n += 1
            sha = hashlib.sha1(f"{repo_id}:{self._n}".encode()).hexdigest()
            parent = repo.commits.get(repo.refs.get(branch, repo.refs.get("main", "")), {})
            repo.commits[sha] = {**(parent if keep else {}), **files}
            repo.refs[branch] = sha
            return sha

    def commit_folder(self, repo_id: str, folder: Path, **kwargs) -> str:
        return self.commit(repo_id, {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}, **kwargs)

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].refs[name] = sha

    def file_gets(self, name: str) -> int:
        """How many times a file's bytes were sent (GET on resolve or on the lfs location)."""
        return sum(
            1
            for m, p in self.requests
            if m == "GET" and ("/resolve/" in p and p.endswith("/" + name) or p.startswith(f"/lfs/{name}"))
        )

    def resolve(self, repo_id: str, revision: str) -> tuple[str | None, dict[str, bytes] | None, str | None]:
        """(sha, files, error code)."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None, "RepoNotFound"
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            return None, None, "RevisionNotFound"
        return sha, repo.commits[sha], None

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for files in repo.commits.values():
                for data in files.values():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return data
        return None


def _split_repo(rest: str) -> tuple[str, str]:
    """'owner/name/tail...' -> ('owner/name', 'tail...'); repo ids here always have an owner."""
    parts = rest.split("/", 2)
    return "/".join(parts[:2]), parts[2] if len(parts) > 2 else ""


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, status: int = 200) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, code: str, head: bool = False) -> None:
            body = json.dumps({"error": code}).encode()
            self._send(404, b"" if head else body, {"X-Error-Code": code, "Content-Type": "application/json"}, head)

        # -- downloads ---------------------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._get(head=True)

        def do_GET(self) -> None:
            self._get(head=False)

        def _get(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(("HEAD" if head else "GET", path))
            if path.startswith("/lfs/"):
                data = hub.blob(path[len("/lfs/") :])
                return self._send(200, data, head=head) if data is not None else self._error("EntryNotFound", head)
            if path.startswith("/api/models/"):
                return self._api_get(path[len("/api/models/") :])
            repo_id, tail = _split_repo(path.lstrip("/"))
            if not tail.startswith("resolve/"):
                return self._error("RepoNotFound", head)
            revision, _, name = tail[len("resolve/") :].partition("/")
            sha, files, err = hub.resolve(repo_id, revision)
            if err:
                return self._error(err, head)
            if name not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, head)
            data = files[name]
            if name.endswith(LARGE_SUFFIXES):
                sha256 = hashlib.sha256(data).hexdigest()
                location = f"http://localhost:{hub.port}/lfs/{sha256}"
                return self._send(
                    302,
                    b"",
                    {
                        "Location": location,
                        "X-Repo-Commit": sha,
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": len(data),
                        "ETag": f'"{blob_sha1(data)}"',
                    },
                    head,
                )
            self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{blob_sha1(data)}"'}, head)

        def _api_get(self, rest: str) -> None:
            repo_id, tail = _split_repo(rest)
            kind, _, revision = tail.partition("/")
            if kind in ("", "revision"):
                sha, files, err = hub.resolve(repo_id, revision or "main")
                if err:
                    return self._error(err)
                return self._json(
                    {"id": repo_id, "sha": sha, "private": False, "siblings": [{"rfilename": n} for n in sorted(files)]}
                )
            if kind == "tree":
                sha, files, err = hub.resolve(repo_id, revision)
                if err:
                    return self._error(err)
                return self._json([_tree_entry(n, d) for n, d in sorted(files.items())])
            self._error("RepoNotFound")

        # -- uploads -----------------------------------------------------------------------------------------
        def do_POST(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(("POST", path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path == "/api/validate-yaml":  # the metadata block of a README.md must parse as YAML
                import yaml

                content = json.loads(body)["content"]
                try:
                    yaml.safe_load(content.split("---")[1] if content.startswith("---") else "")
                except yaml.YAMLError as exc:
                    return self._json({"errors": [{"message": str(exc)}], "warnings": []}, status=400)
                return self._json({"errors": [], "warnings": []})
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = (
                    f"{req.get('organization') or 'user'}/{req['name']}" if "/" not in req["name"] else req["name"]
                )
                if repo_id not in hub.repos:
                    hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
                return self._json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
            repo_id, tail = _split_repo(path[len("/api/models/") :])
            kind, _, revision = tail.partition("/")
            if kind == "branch":
                repo = hub.repos[repo_id]
                repo.refs.setdefault(revision, repo.refs["main"])
                return self._json({})
            if kind == "preupload":
                files = json.loads(body)["files"]
                return self._json(
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for f in files
                        ]
                    }
                )
            if kind == "commit":
                added = {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                sha = hub.commit(repo_id, added, branch=revision)
                return self._json(
                    {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
                )
            self._error("RepoNotFound")

    return Handler


def _tree_entry(name: str, data: bytes) -> dict:
    entry = {"type": "file", "path": name, "size": len(data), "oid": blob_sha1(data)}
    if name.endswith(LARGE_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
