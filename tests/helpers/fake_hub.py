"""A tiny in-process stand-in for the Hugging Face Hub, so push/pull code is tested without a network.

It serves what ``huggingface_hub``, ``transformers``, ``peft`` and ``datasets`` call for a push and a reload:
create a repo, preupload, the legacy LFS batch upload, commit (ndjson), repo info, tree listing, paths-info and
resolve. Like the Hub, preupload sends binary weight/data files (``*.safetensors``, ``*.parquet``, ...) and files
over 10 MB through LFS and the rest as "regular" base64 lines in the commit: ``datasets`` needs that, because it
deletes each parquet shard right after its preupload. Xet is not spoken; the :func:`fake_hub` fixture turns it off
on the client. Only ``main`` exists and no history is kept: a revision is ``main`` or the current head commit.
Repo ids need a namespace (``user/name``). A private repo answers only requests that carry a bearer token.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["FAKE_TOKEN", "FakeHub", "Recorded", "Repo", "fake_hub"]

FAKE_TOKEN = "hf_fakeHubTestToken0123456789"
REPO_TYPES = {"models": "model", "datasets": "dataset"}
# The Hub's default .gitattributes sends these through LFS; so does any file over 10 MB.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.parquet", "*.arrow", "*.onnx", "*.npy")
LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_BATCH = ["info", "lfs", "objects", "batch"]  # after "{user}/{name}.git"

Response = tuple[int, dict[str, str], bytes]


@dataclass
class Recorded:
    """One request as the server saw it; tests assert on these (auth header, create payload, ...)."""

    method: str
    path: str  # URL path, percent-decoded, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int = 0  # the answer's status code

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    folder: Path  # the files of the head commit, as plain files (an absolute, resolved path)
    commits: list[str] = field(default_factory=list)
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256, for files committed through LFS

    @property
    def sha(self) -> str:
        return self.commits[-1]

    def path(self, rel: str) -> Path:
        """``folder / rel``, refusing paths that leave the repo (``..``)."""
        target = (self.folder / rel).resolve()
        if not target.is_relative_to(self.folder):
            raise HubError(400, "BadRequest", f"path {rel!r} leaves the repo")
        return target

    def files(self) -> list[str]:
        """Paths of all files in the repo, sorted, with ``/`` separators."""
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def git_blob_oid(data: bytes) -> str:
    """The id git (and so the Hub) gives a regular file; clients use it as the file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A stdlib HTTP server on 127.0.0.1 (free port, daemon thread) speaking enough of the Hub protocol.

    Use as a context manager. ``endpoint`` is its URL, ``root`` the folder holding the repos
    (``root/{models|datasets}/{user}/{name}/``) and LFS uploads (``root/_lfs``), ``repos`` maps
    ``(repo_type, repo_id)`` to :class:`Repo`, ``requests`` lists every :class:`Recorded` request.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fake-hub-"))
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self
        (self.root / "_lfs").mkdir(parents=True, exist_ok=True)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def do_PUT(self) -> None:
                hub._handle(self, "PUT")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- helpers for tests -----------------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def requests_to(self, method: str, path_part: str) -> list[Recorded]:
        """The recorded requests with this method whose path contains ``path_part``."""
        return [r for r in self.requests if r.method == method and path_part in r.path]

    # -- dispatch --------------------------------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        record = Recorded(method, unquote(url.path), parse_qs(url.query), headers, self._read_body(handler, headers))
        with self._lock:
            self.requests.append(record)
        try:
            status, out_headers, payload = self._route(method, url.path, record)
        except HubError as err:
            status, out_headers = err.status, {"X-Error-Code": err.code, "X-Error-Message": err.message}
            payload = json.dumps({"error": err.message}).encode()
        except Exception as err:  # a malformed request must not kill the server thread
            status, out_headers, payload = 500, {}, json.dumps({"error": f"fake hub: {err!r}"}).encode()
        out_headers.setdefault("Content-Type", "application/json")
        record.status = status
        handler.send_response(status)
        for key, value in out_headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Connection", "close")  # no keep-alive: the client pool never holds a stopped hub's socket
        handler.close_connection = True
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(payload)

    @staticmethod
    def _read_body(handler: BaseHTTPRequestHandler, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() != "chunked":
            length = int(headers.get("content-length") or 0)
            return handler.rfile.read(length) if length else b""
        chunks = []
        while size := int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        handler.rfile.readline()  # the blank line after the last (empty) chunk
        return b"".join(chunks)

    def _route(self, method: str, raw_path: str, req: Recorded) -> Response:
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create(req.json())
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._json({"errors": [], "warnings": []})
        if method == "GET" and parts == ["api", "whoami-v2"]:
            return self._json({"type": "user", "name": "user", "fullname": "Fake User", "orgs": []})
        if parts[0] == "_lfs" and len(parts) >= 2:
            return self._lfs_object(method, parts[1], req)
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in REPO_TYPES:
            return self._api(method, self._find(REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}", req), parts[4:], req)
        repo_type = "dataset" if parts[0] == "datasets" else "model"
        parts = parts[1:] if repo_type == "dataset" else parts
        if method == "POST" and len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == LFS_BATCH:
            return self._lfs_batch(self._find(repo_type, f"{parts[0]}/{parts[1][:-4]}", req), req.json())
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            repo = self._find(repo_type, f"{parts[0]}/{parts[1]}", req)
            self._check_revision(repo, parts[3])
            return self._resolve(repo, "/".join(parts[4:]), req.headers.get("range"))
        raise HubError(404, "NotFound", f"fake hub does not serve {method} {raw_path}")

    def _api(self, method: str, repo: Repo, rest: list[str], req: Recorded) -> Response:
        if not rest and method == "GET":
            return self._info(repo)
        action, rev, path = rest[0], rest[1] if len(rest) > 1 else "main", "/".join(rest[2:])
        self._check_revision(repo, rev)
        if method == "GET" and action == "revision":
            return self._info(repo)
        if method == "GET" and action == "tree":
            return self._tree(repo, path, req.query.get("recursive", ["false"])[0].lower() == "true")
        if method == "POST" and action == "preupload":
            return self._json({"files": [self._upload_mode(f) for f in req.json()["files"]], "commitOid": repo.sha})
        if method == "POST" and action == "commit":
            return self._commit(repo, req.body)
        if method == "POST" and action == "paths-info":
            return self._paths_info(repo, req)
        raise HubError(404, "NotFound", f"fake hub does not serve {method} {req.path}")

    # -- repos -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _json(payload: Any, status: int = 200) -> Response:
        return status, {}, json.dumps(payload).encode()

    def _url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{'datasets/' if repo.repo_type == 'dataset' else ''}{repo.repo_id}"

    def _find(self, repo_type: str, repo_id: str, req: Recorded) -> Repo:
        """The repo, if it exists and the caller may see it (a private repo needs a bearer token, as on the Hub)."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository Not Found for url: {repo_type} {repo_id}")
        if repo.private and not req.headers.get("authorization", "").startswith("Bearer "):
            raise HubError(401, "RepoNotFound", f"Repository Not Found for url: {repo_type} {repo_id}")
        return repo

    @staticmethod
    def _check_revision(repo: Repo, rev: str) -> None:
        if rev not in ("main", repo.sha):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _new_commit(self, repo: Repo) -> str:
        sha = hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}/{len(repo.commits)}".encode()).hexdigest()
        repo.commits.append(sha)
        return sha

    def _create(self, payload: dict[str, Any]) -> Response:
        if not payload.get("organization"):
            raise HubError(400, "BadRequest", "the fake hub needs repo ids with a namespace (user/name)")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                repo = self.repos[(repo_type, repo_id)]
                return self._json({"error": "You already created this repo", "url": self._url(repo)}, 409)
            folder = (self.root / f"{repo_type}s" / repo_id).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            repo = Repo(repo_id, repo_type, private, folder)
            self._new_commit(repo)  # the Hub's initial commit (its .gitattributes is left out)
            self.repos[(repo_type, repo_id)] = repo
        return self._json({"url": self._url(repo), "name": repo_id, "id": repo_id})

    def _info(self, repo: Repo) -> Response:
        now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        info = {"id": repo.repo_id, "_id": repo.sha[:24], "author": repo.repo_id.split("/")[0], "sha": repo.sha}
        info.update(private=repo.private, gated=False, disabled=False, lastModified=now, createdAt=now, tags=[])
        info.update(downloads=0, likes=0, siblings=[{"rfilename": p} for p in repo.files()])
        return self._json(info)

    def _entry(self, repo: Repo, path: Path) -> dict[str, Any]:
        rel = path.relative_to(repo.folder).as_posix()
        if path.is_dir():
            return {"type": "directory", "path": rel, "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0}
        data = path.read_bytes()
        entry = {"type": "file", "path": rel, "oid": git_blob_oid(data), "size": len(data)}
        if rel in repo.lfs:
            entry["lfs"] = {"oid": repo.lfs[rel], "size": len(data), "pointerSize": 134}
        return entry

    def _tree(self, repo: Repo, path: str, recursive: bool) -> Response:
        base = repo.path(path)
        if not base.is_dir():
            raise HubError(404, "EntryNotFound", f"{path} does not exist on main")
        children = base.rglob("*") if recursive else base.iterdir()
        return self._json([self._entry(repo, p) for p in sorted(children)])

    def _paths_info(self, repo: Repo, req: Recorded) -> Response:
        if req.headers.get("content-type", "").startswith("application/json"):
            paths = req.json().get("paths", [])
        else:
            paths = parse_qs(req.body.decode()).get("paths", [])
        return self._json([self._entry(repo, repo.path(p)) for p in paths if repo.path(p).exists()])

    # -- uploads ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _upload_mode(file: dict[str, Any]) -> dict[str, Any]:
        lfs = file.get("size", 0) >= LFS_MIN_SIZE or any(fnmatch.fnmatch(file["path"], p) for p in LFS_PATTERNS)
        return {"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}

    def _lfs_batch(self, repo: Repo, payload: dict[str, Any]) -> Response:
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.root / "_lfs" / obj["oid"]).is_file():  # no actions: the Hub already has it
                href = f"{self.endpoint}/_lfs/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_object(self, method: str, oid: str, req: Recorded) -> Response:
        blob = self.root / "_lfs" / oid
        if method == "PUT":
            if hashlib.sha256(req.body).hexdigest() != oid:
                raise HubError(400, "BadRequest", f"LFS upload does not match its sha256 {oid}")
            blob.write_bytes(req.body)
            return 200, {}, b""
        if method == "POST" and blob.is_file():  # verify
            return self._json({"oid": oid})
        raise HubError(404, "EntryNotFound", f"LFS object {oid} was not uploaded")

    def _commit(self, repo: Repo, body: bytes) -> Response:
        with self._lock:
            for line in filter(None, (raw.strip() for raw in body.splitlines())):
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    parent = value.get("parentCommit")
                    if parent and parent != repo.sha:
                        raise HubError(412, "PreconditionFailed", f"parent commit {parent} is not the head")
                    continue
                target = repo.path(value["path"])
                if key in ("file", "lfsFile"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    repo.lfs.pop(value["path"], None)
                if key == "file":
                    content = value["content"]
                    target.write_bytes(
                        base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    )
                elif key == "lfsFile":
                    blob = self.root / "_lfs" / value["oid"]
                    if not blob.is_file():
                        raise HubError(422, "BadRequest", f"LFS object {value['oid']} of {value['path']} is missing")
                    shutil.copyfile(blob, target)
                    repo.lfs[value["path"]] = value["oid"]
                elif key == "deletedFile":
                    target.unlink(missing_ok=True)
                    repo.lfs.pop(value["path"], None)
                elif key == "deletedFolder":
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    raise HubError(400, "BadRequest", f"fake hub cannot commit {key!r}")
            sha = self._new_commit(repo)
        return self._json({"commitUrl": f"{self._url(repo)}/commit/{sha}", "commitOid": sha})

    def _resolve(self, repo: Repo, path: str, range_header: str | None) -> Response:
        target = repo.path(path)
        if not target.is_file():
            raise HubError(404, "EntryNotFound", f"{path} does not exist on main")
        data = target.read_bytes()
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        headers["ETag"] = f'"{repo.lfs.get(path) or git_blob_oid(data)}"'  # the Hub's ETag of an LFS file is its sha256
        if range_header and range_header.startswith("bytes="):
            start_text, _, end_text = range_header[6:].partition("-")
            start = int(start_text or 0)
            end = min(int(end_text), len(data) - 1) if end_text else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, headers, data[start : end + 1]
        return 200, headers, data


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """Point huggingface_hub, transformers, peft and datasets at a fresh FakeHub for one test, then restore.

    The libraries read ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` once, at import (the test session imports them long
    before this fixture runs, with ``HF_HUB_OFFLINE=1``), so setting the environment is not enough; the copies
    are patched too (monkeypatch restores all of it):

    - ``huggingface_hub.constants``: ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE`` (hf_hub_download), ``HF_HUB_OFFLINE``
      (its HTTP session refuses every request when true), ``HF_HUB_DISABLE_XET`` (hf_xet would upload LFS files to
      a Xet CAS server, which the fake is not), ``HF_HUB_DISABLE_TELEMETRY``, ``HF_HUB_CACHE``;
    - ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi()`` behind ``create_repo`` & co.;
    - ``transformers.utils.hub._hf_api``: transformers builds one shared ``HfApi`` on first use (push_to_hub,
      from_pretrained) and keeps its endpoint; it is reset so it is rebuilt for this hub and dropped afterwards;
    - ``datasets.config``: ``HF_ENDPOINT``, ``HUB_DATASETS_URL``, ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``
      and the cache paths (``HF_DATASETS_CACHE``, ``DOWNLOADED_DATASETS_PATH``, ...);
    - the environment: ``HF_ENDPOINT``, ``HF_TOKEN`` (read at every request), ``HF_HUB_OFFLINE=0`` (peft reads the
      variable itself), ``HF_HUB_DISABLE_XET=1``, telemetry off, and ``HF_HOME`` in ``tmp_path`` so no real
      token or cache is touched.

    ``HfFileSystem`` instances are cached by fsspec with their directory listings; the cache is cleared on both
    sides so no listing leaks between tests.
    """
    import datasets.config
    import transformers.utils.hub
    from huggingface_hub import HfFileSystem, constants, hf_api

    with FakeHub(tmp_path / "hub") as hub:
        home = tmp_path / "hf_home"
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_TOKEN": FAKE_TOKEN,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(home),
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for key in ("TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        for name, value in {
            "ENDPOINT": hub.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_CACHE": str(home / "hub"),
        }.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
        for name, value in {
            "HF_ENDPOINT": hub.endpoint,
            "HUB_DATASETS_URL": hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False,
            "HF_DATASETS_OFFLINE": False,
            "HF_DATASETS_CACHE": home / "datasets",
            "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
            "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
            "HF_MODULES_CACHE": home / "modules",
        }.items():
            monkeypatch.setattr(datasets.config, name, value)
        HfFileSystem.clear_instance_cache()
        try:
            yield hub
        finally:
            HfFileSystem.clear_instance_cache()
