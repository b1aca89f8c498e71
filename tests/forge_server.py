"""A small, honest stand-in for GitHub, GitLab and Gitea/Forgejo, started by tests on loopback.

It serves real Git over smart HTTP (``git http-backend``, git's own CGI) with Basic
authentication, and only the REST endpoints Den uses, with the paths, authentication headers
and JSON fields of each forge's public API documentation:

- GitHub (REST v3, under ``/api/v3`` as on GitHub Enterprise Server): ``GET /user``,
  ``GET /repos/{owner}/{repo}/pulls?head=owner:branch&base=&state=open``,
  ``POST /repos/{owner}/{repo}/pulls`` ``{title, head, base, body, draft}``;
  ``Authorization: Bearer <token>``; git user any, password the token.
- GitLab (v4, ``/api/v4``): ``GET /user``, ``GET /projects/{url-encoded path}/merge_requests?
  source_branch=&target_branch=&state=opened``, ``POST .../merge_requests`` ``{source_branch,
  target_branch, title, description}``; ``PRIVATE-TOKEN: <token>``; git user ``oauth2``.
- Gitea (v1, ``/api/v1``): ``GET /user``, ``GET /repos/{owner}/{repo}/pulls?state=open``,
  ``POST /repos/{owner}/{repo}/pulls`` ``{title, head, base, body}``;
  ``Authorization: token <token>``; git user the token's owner.

Anything else is a 404, a wrong or missing credential a 401. ``fail_next`` makes the next
matching REST call fail (401, 403, 429 with Retry-After, ...). Every request is logged with
its headers so tests can check what Den sent.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

API_ROOT = {"github": "/api/v3", "gitlab": "/api/v4", "gitea": "/api/v1"}


@dataclass
class ForgeUser:
    login: str
    name: str
    email: str | None
    token: str
    can_write: bool = True


@dataclass
class Logged:
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None


@dataclass
class Failure:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    method: str = ""
    path_contains: str = ""


class ForgeServer:
    """``with ForgeServer(kind, root) as forge:``; ``forge.url`` is the base URL."""

    def __init__(self, kind: str, root: Path) -> None:
        assert kind in API_ROOT
        self.kind = kind
        self.root = root
        self.users: dict[str, ForgeUser] = {}
        self.pulls: dict[str, list[dict[str, Any]]] = {}
        self.log: list[Logged] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> ForgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_user(self, login: str, token: str, *, name: str | None = None,
                 email: str | None = None, can_write: bool = True) -> ForgeUser:
        user = ForgeUser(login, name or login.title(), email, token, can_write)
        self.users[token] = user
        return user

    def repo_url(self, path: str) -> str:
        return f"{self.url}/{path}.git"

    def bare(self, path: str) -> Path:
        return self.root / f"{path}.git"

    def fail_next(self, status: int, body: Any, *, headers: dict[str, str] | None = None,
                  method: str = "", path_contains: str = "") -> None:
        self.failures.append(Failure(status, body, headers or {}, method, path_contains))

    def requests(self, prefix: str = "") -> list[Logged]:
        return [r for r in self.log if r.path.startswith(prefix)]

    # --- the REST side ---------------------------------------------------------------

    def _token(self, headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if self.kind == "github":
            return auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if self.kind == "gitlab":
            if "private-token" in headers:
                return headers["private-token"]
            return auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        return auth[len("token "):] if auth.startswith("token ") else None

    def rest(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
             body: Any) -> tuple[int, Any, dict[str, str]]:
        for i, f in enumerate(self.failures):
            if (not f.method or f.method == method) and f.path_contains in path:
                del self.failures[i]
                return f.status, f.body, f.headers
        if self.kind == "github" and headers.get("accept") != "application/vnd.github+json":
            return 415, {"message": "Unsupported 'Accept' header"}, {}
        token = self._token(headers)
        user = self.users.get(token or "")
        if user is None:
            return 401, {"message": "Bad credentials" if self.kind == "github"
                         else "401 Unauthorized"}, {}
        rel = path[len(API_ROOT[self.kind]):]
        if rel == "/user" and method == "GET":
            return 200, self._user_json(user), {}
        parts = [unquote(p) for p in rel.strip("/").split("/")]
        if self.kind == "gitlab":
            if len(parts) == 3 and parts[0] == "projects" and parts[2] == "merge_requests":
                return self._gitlab_mrs(method, parts[1], query, body, user)
        elif len(parts) == 4 and parts[0] == "repos" and parts[3] == "pulls":
            return self._pulls(method, f"{parts[1]}/{parts[2]}", query, body, user)
        return 404, {"message": "Not Found"}, {}

    def _user_json(self, user: ForgeUser) -> dict[str, Any]:
        if self.kind == "github":
            return {"login": user.login, "id": 4242, "name": user.name, "email": user.email}
        if self.kind == "gitlab":
            return {"id": 7, "username": user.login, "name": user.name,
                    "commit_email": user.email, "public_email": None}
        return {"id": 3, "login": user.login, "full_name": user.name, "email": user.email}

    def _branch_exists(self, repo: str, branch: str) -> bool:
        out = subprocess.run(["git", "--git-dir", str(self.bare(repo)), "rev-parse", "--verify",
                              "--quiet", f"refs/heads/{branch}"], capture_output=True)
        return out.returncode == 0

    def _pulls(self, method: str, repo: str, query: dict[str, str], body: Any,
               user: ForgeUser) -> tuple[int, Any, dict[str, str]]:
        if not self.bare(repo).exists():
            return 404, {"message": "Not Found"}, {}
        pulls = self.pulls.setdefault(repo, [])
        owner = repo.split("/")[0]
        if method == "GET":
            if query.get("state") != "open":
                return 400, {"message": "Den must ask for open pull requests"}, {}
            found = [p for p in pulls if p["state"] == "open"]
            if self.kind == "github":
                head = query.get("head", "")
                found = [p for p in found if f"{owner}:{p['head']['ref']}" == head
                         and (not query.get("base") or p["base"]["ref"] == query["base"])]
            return 200, found, {}
        if method != "POST" or not isinstance(body, dict):
            return 404, {"message": "Not Found"}, {}
        if not user.can_write:
            return 403, {"message": "Resource not accessible by personal access token"}, {}
        allowed = {"github": {"title", "head", "base", "body", "draft"},
                   "gitea": {"title", "head", "base", "body"}}[self.kind]
        if set(body) - allowed or not {"title", "head", "base"} <= set(body):
            return 422, {"message": f"unexpected fields {sorted(set(body) - allowed)}"}, {}
        head, base = body["head"], body["base"]
        if not self._branch_exists(repo, base):
            if self.kind == "github":
                return 422, {"message": "Validation Failed", "errors": [
                    {"resource": "PullRequest", "field": "base", "code": "invalid"}]}, {}
            return 404, {"message": "GetBranch: branch does not exist"}, {}
        if not self._branch_exists(repo, head):
            if self.kind == "github":
                return 422, {"message": "Validation Failed", "errors": [
                    {"resource": "PullRequest", "field": "head", "code": "invalid"}]}, {}
            return 404, {"message": "GetBranch: head branch does not exist"}, {}
        for p in pulls:
            if p["state"] == "open" and p["head"]["ref"] == head and p["base"]["ref"] == base:
                if self.kind == "github":
                    return 422, {"message": "Validation Failed", "errors": [{
                        "resource": "PullRequest", "code": "custom",
                        "message": f"A pull request already exists for {owner}:{head}."}]}, {}
                return 409, {"message": "pull request already exists for these targets "
                             f"[id: {p['number']}, issue_id: {p['number']}, head_repo_id: 1, "
                             f"base_repo_id: 1, head_branch: {head}, base_branch: {base}]"}, {}
        number = len(pulls) + 1
        web = "pull" if self.kind == "github" else "pulls"
        pr = {"number": number, "state": "open", "title": body["title"],
              "body": body.get("body", ""), "draft": body.get("draft", False),
              "head": {"ref": head}, "base": {"ref": base}, "user": {"login": user.login},
              "html_url": f"{self.url}/{repo}/{web}/{number}"}
        pulls.append(pr)
        return 201, pr, {}

    def _gitlab_mrs(self, method: str, project: str, query: dict[str, str], body: Any,
                    user: ForgeUser) -> tuple[int, Any, dict[str, str]]:
        if not self.bare(project).exists():
            return 404, {"message": "404 Project Not Found"}, {}
        mrs = self.pulls.setdefault(project, [])
        if method == "GET":
            if query.get("state") != "opened":
                return 400, {"message": "Den must ask for opened merge requests"}, {}
            found = [m for m in mrs if m["state"] == "opened"
                     and (not query.get("source_branch")
                          or m["source_branch"] == query["source_branch"])
                     and (not query.get("target_branch")
                          or m["target_branch"] == query["target_branch"])]
            return 200, found, {}
        if method != "POST" or not isinstance(body, dict):
            return 404, {"message": "404 Not Found"}, {}
        if not user.can_write:
            return 403, {"message": "403 Forbidden"}, {}
        allowed = {"source_branch", "target_branch", "title", "description"}
        if set(body) - allowed or not {"source_branch", "target_branch", "title"} <= set(body):
            return 400, {"error": f"unexpected fields {sorted(set(body) - allowed)}"}, {}
        src, dst = body["source_branch"], body["target_branch"]
        if not self._branch_exists(project, dst) or not self._branch_exists(project, src):
            return 422, {"message": ["Target branch does not exist"]
                         if not self._branch_exists(project, dst)
                         else ["Source branch does not exist"]}, {}
        for m in mrs:
            if m["state"] == "opened" and m["source_branch"] == src \
                    and m["target_branch"] == dst:
                return 409, {"message": ["Another open merge request already exists for this "
                                         f"source branch: !{m['iid']}"]}, {}
        iid = len(mrs) + 1
        mr = {"id": 1000 + iid, "iid": iid, "state": "opened", "title": body["title"],
              "description": body.get("description", ""), "source_branch": src,
              "target_branch": dst, "draft": body["title"].startswith("Draft:"),
              "web_url": f"{self.url}/{project}/-/merge_requests/{iid}"}
        mrs.append(mr)
        return 201, mr, {}

    # --- the git side -----------------------------------------------------------------

    def git_user(self, headers: dict[str, str]) -> ForgeUser | None:
        auth = headers.get("authorization", "")
        if not auth.startswith("Basic "):
            return None
        try:
            name, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return None
        user = self.users.get(secret)
        if user is None or not name:
            return None
        if self.kind == "gitlab" and name not in ("oauth2", user.login):
            return None
        if self.kind == "gitea" and name != user.login:
            return None
        return user


def http_backend(body: bytes, env: dict[str, str]) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Run ``git http-backend`` (git's smart HTTP CGI) on one request: its status, body and
    headers."""
    out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                         check=False).stdout
    head, _, payload = out.partition(b"\r\n\r\n")
    status = 200
    headers: list[tuple[str, str]] = []
    for line in head.decode().split("\r\n"):
        name, _, value = line.partition(": ")
        if name.lower() == "status":
            status = int(value.split()[0])
        elif name:
            headers.append((name, value))
    return status, payload, headers


def _dechunk(rfile: Any) -> bytes:
    out = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            rfile.readline()
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()


def _handler(forge: ForgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return _dechunk(self.rfile)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self) -> None:
            path, _, query = self.path.partition("?")
            headers = {k.lower(): v for k, v in self.headers.items()}
            body = self._body()
            if path.startswith(API_ROOT[forge.kind] + "/"):
                try:
                    data = json.loads(body) if body else None
                except ValueError:
                    data = None
                with forge.lock:
                    forge.log.append(Logged(self.command, path, headers, data))
                    q = {k: v[0] for k, v in parse_qs(query).items()}
                    status, out, extra = forge.rest(self.command, path, q, headers, data)
                payload = json.dumps(out).encode()
                self._reply(status, payload,
                            [("Content-Type", "application/json"), *extra.items()])
                return
            forge.log.append(Logged(self.command, path, headers))
            if ".git/" not in path:
                self._reply(404, b"not found", [])
                return
            user = forge.git_user(headers)
            if user is None:
                self._reply(401, b"authentication required",
                            [("WWW-Authenticate", 'Basic realm="forge"')])
                return
            pushing = "git-receive-pack" in path or "service=git-receive-pack" in query
            if pushing and not user.can_write:
                self._reply(403, b"write access denied", [])
                return
            self._cgi(path, query, headers, body, user)

        def _cgi(self, path: str, query: str, headers: dict[str, str], body: bytes,
                 user: ForgeUser) -> None:
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(forge.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "GIT_CONFIG_NOSYSTEM": "1",
                "HOME": str(forge.root),
                "REQUEST_METHOD": self.command,
                "PATH_INFO": unquote(urlsplit(path).path),
                "QUERY_STRING": query,
                "CONTENT_TYPE": headers.get("content-type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "HTTP_CONTENT_ENCODING": headers.get("content-encoding", ""),
                "GIT_PROTOCOL": headers.get("git-protocol", ""),
                "REMOTE_USER": user.login,
                "REMOTE_ADDR": "127.0.0.1",
            }
            self._reply(*http_backend(body, env))

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def make_forge_repo(forge: ForgeServer, path: str, files: dict[str, str], *,
                    branch: str = "main", extra_branches: tuple[str, ...] = ()) -> Path:
    """A bare repository ``path`` on the forge with one commit of ``files`` on ``branch``."""
    bare = forge.bare(path)
    bare.parent.mkdir(parents=True, exist_ok=True)
    work = forge.root / ".work" / path
    work.mkdir(parents=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "Owner", "GIT_AUTHOR_EMAIL": "owner@example.com",
           "GIT_COMMITTER_NAME": "Owner", "GIT_COMMITTER_EMAIL": "owner@example.com"}

    def git(*args: str, cwd: Path = work) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    git("init", "-q", "-b", branch)
    for rel, content in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(content)
    git("add", "-A")
    git("commit", "-q", "-m", "initial")
    for extra in extra_branches:
        git("branch", extra)
    git("clone", "-q", "--bare", str(work), str(bare), cwd=forge.root)
    subprocess.run(["git", "--git-dir", str(bare), "config", "http.receivepack", "true"],
                   check=True)
    return bare
