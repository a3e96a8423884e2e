"""A loopback stand-in for the Hugging Face Hub, and a guard that fails any connection beyond 127.0.0.1.

`LoopbackHub` is a threaded HTTP server on 127.0.0.1 that keeps repositories in memory and speaks the part of
the Hub API that huggingface_hub 2.4 (with `HF_HUB_DISABLE_XET=1`), transformers and datasets use to publish
and load a repository:

| request | used by |
|---|---|
| `GET /api/whoami-v2` | token check |
| `GET /api/agent-harnesses` | huggingface_hub's agent detection (an empty registry) |
| `POST /api/repos/create` | `create_repo` (409 when the repo exists) |
| `POST /api/validate-yaml` | `create_commit` when README.md is committed |
| `POST /api/{type}s/{repo}/preupload/{rev}` | upload modes: `lfs` for weights and parquet, else `regular` |
| `POST /{prefix}{repo}.git/info/lfs/objects/batch` | LFS batch API, basic transfer |
| `PUT /lfs-upload/{oid}`, `POST /lfs-verify` | the upload and verify hrefs the batch answer hands out |
| `POST /api/{type}s/{repo}/commit/{rev}` | NDJSON commit: `header`, `file`, `lfsFile`, deletions |
| `POST /api/{type}s/{repo}/branch/{branch}` | `create_branch` |
| `GET /api/{type}s/{repo}[/revision/{rev}]` | `model_info` / `dataset_info` / `repo_info` |
| `GET /api/{type}s/{repo}/tree/{rev}[/{path}]` | `list_repo_tree` (and `HfFileSystem.ls` / `glob`) |
| `POST /api/{type}s/{repo}/paths-info/{rev}` | `get_paths_info` (and `HfFileSystem.info`) |
| `HEAD`/`GET /{prefix}{repo}/resolve/{rev}/{path}` | `hf_hub_download`, `HfFileSystem` (see `_resolve`) |

Anything else is answered 404 with `X-Error-Code: EntryNotFound` and listed in `unhandled`, so a test can show
that nothing the clients needed was missing. Public repositories are readable without a token; writes and
private repositories need one of `tokens`.
"""

import base64
import contextlib
import hashlib
import http.server
import ipaddress
import json
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

LFS_SUFFIXES = (
    ".safetensors",
    ".parquet",
    ".bin",
    ".pt",
    ".pth",
    ".arrow",
    ".h5",
    ".onnx",
    ".msgpack",
    ".zip",
)
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
TYPE_OF_API_SEGMENT = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    def entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": self.git_oid, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    commit_log: list[tuple[str, str]] = field(default_factory=list)  # (branch, commit oid), in order

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def add_commit(self, branch: str, message: str, files: dict[str, Blob]) -> Commit:
        parent = self.branches.get(branch)
        seed = f"{self.repo_id}\0{branch}\0{len(self.commits)}\0{message}\0{time.time_ns()}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, message, files)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        self.commit_log.append((branch, commit.oid))
        return commit


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class LoopbackHub:
    """The in-memory Hub; `url` is its endpoint (`http://127.0.0.1:PORT`)."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_loopback_write_token",), user: str = "loopback-user"):
        self.tokens, self.user = set(tokens), user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        return self.repo(repo_id, repo_type).resolve(revision).files[path].data


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect; every answer carries Content-Length
    server_hub: LoopbackHub

    def log_message(self, format, *args) -> None:  # the test output stays readable
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # --- plumbing ---

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _token(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value.removeprefix("Bearer ").strip() if value.startswith("Bearer ") else None

    def _require_token(self) -> None:
        if self._token() not in self.server_hub.tokens:
            raise _HubError(401, None, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.server_hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self._token() not in self.server_hub.tokens):
            raise _HubError(404 if repo is None else 401, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        raw_path, _, query = self.path.partition("?")
        with hub.lock:
            hub.requests.append((method, raw_path))
        segments = [urllib.parse.unquote(part) for part in raw_path.strip("/").split("/")]
        params = urllib.parse.parse_qs(query)
        body = self._body() if method in ("POST", "PUT") else b""
        try:
            with hub.lock:
                if not self._route(method, segments, params, body):
                    hub.unhandled.append((method, self.path))
                    raise _HubError(404, "EntryNotFound", f"{method} {raw_path} is not served here")
        except _HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self._json({"error": error.message}, error.status, headers)

    def _route(self, method: str, seg: list[str], params: dict, body: bytes) -> bool:
        if seg == ["api", "whoami-v2"] and method == "GET":
            self._require_token()
            self._json(
                {"type": "user", "name": self.server_hub.user, "orgs": [], "auth": {"type": "access_token"}}
            )
        elif seg == ["api", "agent-harnesses"] and method == "GET":  # huggingface_hub's agent detection
            self._json({"standardEnvVars": [], "harnesses": {}})
        elif seg == ["api", "repos", "create"] and method == "POST":
            self._create_repo(json.loads(body))
        elif seg == ["api", "validate-yaml"] and method == "POST":
            self._validate_yaml(json.loads(body))
        elif seg[:1] == ["api"] and len(seg) >= 4 and seg[1] in TYPE_OF_API_SEGMENT:
            return self._repo_api(
                method, TYPE_OF_API_SEGMENT[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:], params, body
            )
        elif seg[:1] == ["lfs-upload"] and method == "PUT":
            self._lfs_upload(seg[1], body)
        elif seg == ["lfs-verify"] and method == "POST":
            oid = json.loads(body)["oid"]
            self._json({"ok": True} if oid in self.server_hub.lfs_objects else {"error": "missing"})
        elif raw_batch := self._lfs_batch_target(seg):
            self._lfs_batch(*raw_batch, json.loads(body))
        elif resolve := self._resolve_target(seg):
            if method not in ("GET", "HEAD"):
                return False
            self._resolve(*resolve)
        else:
            return False
        return True

    # --- repositories ---

    def _create_repo(self, payload: dict) -> None:
        self._require_token()
        hub = self.server_hub
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
        url = f"{hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in hub.repos:
            raise _HubError(409, None, f"You already created this {repo_type} repo: {url}")
        repo = Repo(
            repo_type, repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
        )
        gitattributes = b"".join(
            b"*%s filter=lfs diff=lfs merge=lfs -text\n" % suffix.encode() for suffix in LFS_SUFFIXES
        )
        repo.add_commit("main", "initial commit", {".gitattributes": Blob(gitattributes, lfs=False)})
        hub.repos[(repo_type, repo_id)] = repo
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---", 2)[1])
                if not isinstance(metadata, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except yaml.YAMLError as error:
                errors.append({"message": f"invalid YAML: {error}"})
        self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _repo_api(
        self, method: str, repo_type: str, repo_id: str, rest: list[str], params: dict, body: bytes
    ):
        repo = self._repo(repo_type, repo_id)
        action, argument = (rest[0], rest[1:]) if rest else ("info", [])
        if method == "GET" and action in ("info", "revision"):
            self._info(repo, argument[0] if argument else "main")
        elif method == "POST" and action == "preupload":
            self._require_token()
            self._preupload(repo, argument[0], json.loads(body))
        elif method == "POST" and action == "commit":
            self._require_token()
            self._commit_ndjson(repo, argument[0], body)
        elif method == "POST" and action == "branch":
            self._require_token()
            self._create_branch(repo, argument[0], json.loads(body or b"{}"))
        elif method == "GET" and action == "tree":
            self._tree(repo, argument[0], "/".join(argument[1:]), params)
        elif method == "POST" and action == "paths-info":
            self._paths_info(repo, argument[0], body)
        else:
            return False
        return True

    def _info(self, repo: Repo, revision: str) -> None:
        commit = self._commit(repo, revision)
        stamp = "2025-01-01T00:00:00.000Z"
        self._json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": stamp,
                "createdAt": stamp,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        commit = self._commit(repo, revision)
        files = []
        for item in payload["files"]:
            path = item["path"]
            lfs = path.endswith(LFS_SUFFIXES) or item["size"] > 10 * 2**20
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            files.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json({"files": files, "commitOid": commit.oid})

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if branch in repo.branches:
            raise _HubError(409, None, f"Branch {branch} already exists")
        start = self._commit(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._json({})

    def _commit_ndjson(self, repo: Repo, revision: str, body: bytes) -> None:
        if revision not in repo.branches:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(repo.resolve(revision).files)
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[revision]:
                    raise _HubError(412, None, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.server_hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise _HubError(
                        400, None, f"LFS object {value['oid']} of {value['path']} was never uploaded"
                    )
                files[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: blob for path, blob in files.items() if not path.startswith(folder)}
            else:
                raise _HubError(400, None, f"unknown commit operation {key!r}")
        commit = repo.add_commit(revision, message, files)
        prefix = URL_PREFIXES[repo.repo_type]
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.server_hub.url}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )

    def _entries(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(commit.files[path].entry(path))
        for name in sorted(folders):
            oid = hashlib.sha1(f"tree {name} {commit.oid}".encode()).hexdigest()
            entries.append({"type": "directory", "oid": oid, "size": 0, "path": name})
        return entries

    def _tree(self, repo: Repo, revision: str, folder: str, params: dict) -> None:
        commit = self._commit(repo, revision)
        recursive = params.get("recursive", ["False"])[0].lower() == "true"
        entries = self._entries(commit, folder, recursive)
        if folder and not entries:
            raise _HubError(404, "EntryNotFound", f"{folder} does not exist on {revision}", commit.oid)
        self._json(entries)

    def _paths_info(self, repo: Repo, revision: str, body: bytes) -> None:
        commit = self._commit(repo, revision)
        paths = urllib.parse.parse_qs(body.decode()).get("paths", [])
        result = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                result.append(commit.files[path].entry(path))
            elif any(name.startswith(path + "/") for name in commit.files):
                oid = hashlib.sha1(f"tree {path} {commit.oid}".encode()).hexdigest()
                result.append({"type": "directory", "oid": oid, "size": 0, "path": path})
        self._json(result)

    # --- LFS ---

    def _lfs_batch_target(self, seg: list[str]) -> tuple[str, str] | None:
        if seg[-4:] != ["info", "lfs", "objects", "batch"] or not seg[-5].endswith(".git"):
            return None
        repo_type = "dataset" if seg[0] == "datasets" else "space" if seg[0] == "spaces" else "model"
        start = 0 if repo_type == "model" else 1
        return repo_type, f"{seg[start]}/{seg[start + 1].removesuffix('.git')}"

    def _lfs_batch(self, repo_type: str, repo_id: str, payload: dict) -> None:
        self._require_token()
        self._repo(repo_type, repo_id)
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.server_hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.server_hub.url}/lfs-upload/{item['oid']}"},
                    "verify": {"href": f"{self.server_hub.url}/lfs-verify"},
                }
            objects.append(entry)
        self._json(
            {"transfer": "basic", "objects": objects},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_upload(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, None, f"uploaded content does not hash to {oid}")
        self.server_hub.lfs_objects[oid] = body
        self._send(200)

    # --- downloads ---

    def _resolve_target(self, seg: list[str]) -> tuple[str, str, str, str] | None:
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(seg[0], "model")
        start = 0 if repo_type == "model" else 1
        if len(seg) < start + 5 or seg[start + 2] != "resolve":
            return None
        return repo_type, f"{seg[start]}/{seg[start + 1]}", seg[start + 3], "/".join(seg[start + 4 :])

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """A file with the headers `hf_hub_download` needs: ETag (git blob sha1, or sha256 for LFS files) and
        X-Repo-Commit; for LFS files X-Linked-Etag / X-Linked-Size, which the Hub sends with its CDN redirect
        (served directly here); byte ranges for `HfFileSystem`."""
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", commit.oid)
        headers = {
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            headers.update(
                {
                    "ETag": f'"{blob.sha256}"',
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "X-Linked-Size": len(blob.data),
                }
            )
        else:
            headers["ETag"] = f'"{blob.git_oid}"'
        data, status = blob.data, 200
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes="):
            first, _, last = requested.removeprefix("bytes=").partition("-")
            start = int(first) if first else max(len(data) - int(last), 0)
            end = int(last) if first and last else len(data) - 1
            if start >= len(data):
                headers["Content-Range"] = f"bytes */{len(data)}"
                self._send(416, b"", headers)
                return
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers)


@contextlib.contextmanager
def silent_endpoint():
    """An endpoint URL on 127.0.0.1 that accepts connections (the kernel completes them) and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def closed_endpoint() -> str:
    """An endpoint URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def _is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def install_network_guard(log_path: str, set_attribute=setattr) -> None:
    """Make name lookups and connections to anything but loopback fail, and append each attempt to `log_path`.

    Patches `socket.getaddrinfo` and `socket.socket.connect` / `connect_ex`, which every Python HTTP client
    (httpx2, requests, aiohttp, urllib) goes through. A blocked lookup raises `socket.gaierror`, like a
    machine without DNS. `set_attribute` is `monkeypatch.setattr` in a test process, so the patch is undone
    after it.
    """
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def blocked(target) -> socket.gaierror:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"pid {os.getpid()}: {target!r}\n")
        return socket.gaierror(socket.EAI_NONAME, f"network guard: {target!r} is outside 127.0.0.1")

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            raise blocked(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def outside(sock, address) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0])

    def connect(sock, address):
        if outside(sock, address):
            raise blocked(address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if outside(sock, address):
            raise blocked(address)
        return real_connect_ex(sock, address)

    set_attribute(socket, "getaddrinfo", getaddrinfo)
    set_attribute(socket.socket, "connect", connect)
    set_attribute(socket.socket, "connect_ex", connect_ex)


def write_guard_sitecustomize(folder, log_path) -> str:
    """Write a `sitecustomize.py` that installs the guard at interpreter start into `folder`, and return the
    folder: first on a subprocess's PYTHONPATH, it runs before anything else is imported."""
    os.makedirs(folder, exist_ok=True)
    source = (
        "import importlib.util\n"
        f"_spec = importlib.util.spec_from_file_location('_loopback_guard', {os.path.abspath(__file__)!r})\n"
        "_guard = importlib.util.module_from_spec(_spec)\n"
        "_spec.loader.exec_module(_guard)\n"
        f"_guard.install_network_guard({str(log_path)!r})\n"
    )
    with open(os.path.join(folder, "sitecustomize.py"), "w", encoding="utf-8") as handle:
        handle.write(source)
    return str(folder)
