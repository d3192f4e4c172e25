"""The API documentation page (GET /docs, and / redirects there) and JSON error answers.

BentoML's own page at / loads Swagger UI and Google Tag Manager from the internet: a
third-party script on an on-premises model server (it tells an outside party who opens it)
that also breaks offline. `DOCS_HTML` is our own page, a few lines of HTML and plain
JavaScript served from the package: it reads /docs.json (serving/openapi.py) and lists every
route with its parameters, body, answers and their schemas, with a form to try the GET
routes and the uploads. No script, font or style leaves the server.

`JsonErrors` makes every error answer JSON `{"error": …}` (DESIGN.md §3): BentoML and
Starlette answer an unknown route (404) or a wrong method (405, `GET /predict`) in plain text.
"""

from __future__ import annotations

import contextlib
import json

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DOCS_PATH = "/docs"

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mp2a API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:70rem;padding:1rem 1.5rem;
color:#1d2330}
h1{font-size:1.5rem;margin:.2rem 0}code,pre{font:13px ui-monospace,monospace}
pre{background:#f4f5f7;padding:.6rem;overflow:auto;border-radius:4px;max-height:24rem}
details{border:1px solid #d8dce3;border-radius:5px;margin:.45rem 0;padding:.3rem .7rem}
summary{cursor:pointer;font-weight:600}.m{display:inline-block;min-width:3.6rem;color:#fff;
border-radius:3px;text-align:center;font-size:12px;padding:1px 4px;margin-right:.4rem}
.get{background:#2f6fb5}.post{background:#2c8a4b}.put{background:#9b6a12}
.delete{background:#b33}.lock{color:#9b6a12;font-weight:400;font-size:13px}
table{border-collapse:collapse}td,th{border-bottom:1px solid #e3e6eb;padding:2px 8px;
text-align:left;vertical-align:top}.muted{color:#5b6473}
</style></head><body>
<h1 id="title">mp2a API</h1>
<p class="muted" id="about">Reading <a href="/docs.json">/docs.json</a>&hellip;</p>
<div id="routes"></div>
<script>
"use strict";
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",
  '"':"&quot;"}[c]));
const pretty = o => "<pre>" + esc(JSON.stringify(o, null, 2)) + "</pre>";
function resolve(spec, s, depth) {
  if (!s || depth > 6) return s;
  if (s.$ref) return resolve(spec, s.$ref.split("/").slice(1).reduce((o, k) => o[k], spec),
    depth + 1);
  if (Array.isArray(s)) return s.map(x => resolve(spec, x, depth + 1));
  if (typeof s === "object") {
    const out = {};
    for (const [k, v] of Object.entries(s)) out[k] = resolve(spec, v, depth + 1);
    return out;
  }
  return s;
}
function tryForm(path, method, op) {
  const params = (op.parameters || []).filter(p => p.in === "query" || p.in === "path");
  const body = op.requestBody && op.requestBody.content || {};
  const multipart = body["multipart/form-data"];
  const json = body["application/json"];
  let html = '<form data-path="' + esc(path) + '" data-method="' + method + '">';
  for (const p of params) html += '<label>' + esc(p.name) + ' <input name="p:' +
    esc(p.name) + '"></label> ';
  if (multipart) {
    const props = (multipart.schema || {}).properties || {};
    for (const [name, s] of Object.entries(props)) html += '<label>' + esc(name) +
      ' <input type="file" name="f:' + esc(name) + '"' + (s.type === "array" ? " multiple" : "")
      + '></label> ';
  }
  if (json) html += '<br><textarea name="json" rows="3" cols="60" placeholder="JSON body' +
    ' (optional)"></textarea>';
  if (op.security) html += '<br><label>Bearer token <input name="token" type="password">' +
    '</label>';
  return html + ' <button>Send</button><pre class="out" hidden></pre></form>';
}
async function send(ev) {
  ev.preventDefault();
  const f = ev.target, method = f.dataset.method.toUpperCase();
  let path = f.dataset.path;
  const query = new URLSearchParams(), headers = {}, form = new FormData();
  let body = null, files = false;
  for (const el of f.elements) {
    if (!el.name) continue;
    if (el.name.startsWith("p:")) {
      const n = el.name.slice(2);
      if (path.includes("{" + n + "}")) path = path.replace("{" + n + "}",
        encodeURIComponent(el.value));
      else if (el.value) query.set(n, el.value);
    } else if (el.name.startsWith("f:")) {
      for (const file of el.files) { form.append(el.name.slice(2), file); files = true; }
    } else if (el.name === "json" && el.value.trim()) {
      body = el.value; headers["Content-Type"] = "application/json";
    } else if (el.name === "token" && el.value) {
      headers["Authorization"] = "Bearer " + el.value;
    }
  }
  if (files) body = form;
  const out = f.querySelector(".out");
  out.hidden = false;
  try {
    const r = await fetch(path + (query.size ? "?" + query : ""), {method, headers,
      body: method === "GET" ? null : body});
    const text = await r.text();
    let shown = text;
    try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) {}
    out.textContent = r.status + " " + r.statusText + "\\n" + shown;
  } catch (e) { out.textContent = String(e); }
}
async function main() {
  const spec = await (await fetch("/docs.json")).json();
  const info = spec.info || {};
  document.getElementById("title").textContent = (info.title || "mp2a") + " " +
    (info.version || "");
  document.getElementById("about").innerHTML = esc(info.description || "") +
    ' &middot; the document: <a href="/docs.json">/docs.json</a> (OpenAPI ' +
    esc(spec.openapi || "") + ")";
  let html = "";
  for (const [path, ops] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(ops)) {
      if (!["get", "post", "put", "delete", "patch"].includes(method)) continue;
      html += '<details><summary><span class="m ' + method + '">' + method.toUpperCase() +
        "</span><code>" + esc(path) + "</code> " + esc(op.summary || "") +
        (op.security ? ' <span class="lock">admin token</span>' : "") + "</summary>";
      if (op.description) html += "<p>" + esc(op.description) + "</p>";
      const params = op.parameters || [];
      if (params.length) {
        html += "<table><tr><th>parameter</th><th>in</th><th>schema</th><th></th></tr>";
        for (const p of params) html += "<tr><td><code>" + esc(p.name) + "</code></td><td>" +
          esc(p.in) + "</td><td><code>" + esc(JSON.stringify(resolve(spec, p.schema, 0))) +
          "</code></td><td>" + esc(p.description || "") + "</td></tr>";
        html += "</table>";
      }
      if (op.requestBody) {
        for (const [type, c] of Object.entries(op.requestBody.content || {}))
          html += "<p>Body <code>" + esc(type) + "</code></p>" +
            pretty(resolve(spec, c.schema, 0));
      }
      html += "<table><tr><th>answer</th><th></th></tr>";
      for (const [code, r] of Object.entries(op.responses || {})) {
        const c = r.content && (r.content["application/json"] || Object.values(r.content)[0]);
        html += "<tr><td><code>" + esc(code) + "</code></td><td>" + esc(r.description || "") +
          (c && c.schema ? "<details><summary>schema</summary>" +
          pretty(resolve(spec, c.schema, 0)) + "</details>" : "") + "</td></tr>";
      }
      html += "</table><p><b>Try it</b></p>" + tryForm(path, method, op) + "</details>";
    }
  }
  const routes = document.getElementById("routes");
  routes.innerHTML = html;
  for (const f of routes.querySelectorAll("form")) f.addEventListener("submit", send);
}
main().catch(e => {
  document.getElementById("about").textContent = "cannot read /docs.json: " + e;
});
</script>
</body></html>
"""


def _message(status: int, method: str, path: str, headers: Headers, text: str) -> str:
    if status == 404:
        return f"no route {path}; the routes are listed at {DOCS_PATH}"
    if status == 405:
        allowed = headers.get("allow")
        use = f"use {allowed}" if allowed else f"see {DOCS_PATH}"
        return f"{method} is not allowed on {path}; {use}"
    if status >= 500:  # its text may hold internals: the log has it
        return "internal error; the server's log has the details"
    return text.strip()[:500] or f"HTTP {status}; see {DOCS_PATH}"


def _is_error_body(raw: bytes, headers: Headers) -> bool:
    """Already `{"error": …}` JSON (ours): passed on untouched."""
    if not headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and "error" in body


class JsonErrors:
    """ASGI middleware: GET / redirects to /docs, GET /docs is `DOCS_HTML`, and an error
    answer (4xx/5xx) that is not JSON becomes `{"error": …}` with the same status and
    headers (its length and type excepted)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if method in ("GET", "HEAD") and path in ("/", DOCS_PATH):
            page = (
                RedirectResponse(DOCS_PATH, status_code=307)
                if path == "/"
                else HTMLResponse(DOCS_HTML)
            )
            await page(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def wrapped(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    start = message  # sent once the body has gone by, rewritten if need be
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            old = Headers(raw=start.get("headers", []))
            raw = b"".join(chunks)
            if _is_error_body(raw, old):
                await send(start)
                await send({"type": "http.response.body", "body": raw})
                return
            text = raw.decode("utf-8", "replace")
            if old.get("content-type", "").startswith("application/json"):
                with contextlib.suppress(ValueError, AttributeError):  # FastAPI's {"detail"}
                    text = str(json.loads(text).get("detail", text))
            error = _message(start["status"], method, path, old, text)
            body = json.dumps({"error": error}).encode()
            headers = MutableHeaders(raw=list(start.get("headers", [])))
            headers["content-type"] = "application/json"
            headers["content-length"] = str(len(body))
            await send({**start, "headers": headers.raw})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

        await self.app(scope, receive, wrapped)
