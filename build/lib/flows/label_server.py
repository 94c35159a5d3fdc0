"""`alignflow label serve`: a local web page where people pick the better of two answers.

Keys: 1 = left is better, 2 = right is better, t = tie, s = skip. Every judgement is stored at once
in the SQLite label store (tasks/labeling.py), so closing the tab or killing the server loses nothing.
"""

from __future__ import annotations

import ipaddress
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tasks.labeling import LabelError, LabelStore

MAX_BODY = 4096  # bytes: a judgement is three short strings
JUDGEMENT = '{"item_id": "...", "annotator": "your name", "key": "1" | "2" | "t" | "s"}'

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>alignflow labeling</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
 header { background: #1d2330; color: white; padding: 12px 24px; display: flex; gap: 24px; align-items: center; }
 header h1 { font-size: 18px; margin: 0; flex: 1; }
 #bar { width: 260px; height: 10px; background: #49506a; border-radius: 5px; overflow: hidden; }
 #fill { height: 100%; width: 0; background: #4cc38a; }
 main { max-width: 1100px; margin: 24px auto; padding: 0 24px; }
 .prompt { background: white; border-radius: 8px; padding: 16px 20px; margin-bottom: 16px; font-size: 17px; }
 .turn { padding: 6px 0; } .turn + .turn { border-top: 1px solid #e5e7eb; }
 .role { font-size: 12px; text-transform: uppercase; color: #6b7280; display: block; }
 .turn.assistant div { color: #374151; } .turn.system div { font-style: italic; color: #4b5563; }
 .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
 .answer { background: white; border-radius: 8px; padding: 16px 20px; min-height: 120px; border: 2px solid transparent; }
 .answer h2 { font-size: 13px; text-transform: uppercase; color: #6b7280; margin: 0 0 8px; }
 .keys { margin-top: 18px; color: #4b5563; } kbd { background: white; border: 1px solid #ccc; border-radius: 4px; padding: 1px 6px; }
 #done { display: none; font-size: 20px; } #who { display: none; }
</style></head>
<body>
<header><h1>Which answer is better?</h1><span id="annot"></span><div id="bar"><div id="fill"></div></div><span id="count"></span></header>
<main>
 <form id="who"><label>Annotator id: <input id="annotator" autofocus></label> <button>Start</button></form>
 <div id="task">
  <div class="prompt" id="prompt"></div>
  <div class="answers">
   <div class="answer" id="left"><h2>1 &middot; left</h2><div id="left_text"></div></div>
   <div class="answer" id="right"><h2>2 &middot; right</h2><div id="right_text"></div></div>
  </div>
  <p class="keys"><kbd>1</kbd> left is better &nbsp; <kbd>2</kbd> right is better &nbsp; <kbd>t</kbd> tie &nbsp; <kbd>s</kbd> skip</p>
 </div>
 <p id="done">All pairs are labeled. Thank you!</p>
</main>
<script>
const token = new URLSearchParams(location.search).get("token");
let annotator = token ? "" : new URLSearchParams(location.search).get("annotator") || localStorage.getItem("annotator");
let item = null, busy = false;
async function next() {
  const r = await fetch("/api/next?" + (token ? "token=" + encodeURIComponent(token) : "annotator=" + encodeURIComponent(annotator)));
  const data = await r.json();
  if (!r.ok) { document.getElementById("task").style.display = "none"; document.getElementById("done").style.display = "block";
               document.getElementById("done").textContent = data.error; return; }
  annotator = data.annotator;
  document.getElementById("annot").textContent = "annotator: " + annotator;
  const p = data.progress;
  document.getElementById("fill").style.width = (p.total ? 100 * p.done / p.total : 0) + "%";
  document.getElementById("count").textContent = p.done + " / " + p.total;
  item = data.item;
  document.getElementById("task").style.display = item ? "block" : "none";
  document.getElementById("done").style.display = item ? "none" : "block";
  if (item) {
    const prompt = document.getElementById("prompt");
    prompt.replaceChildren();
    if (item.messages) {  // a conversation: one block a turn, its role above it
      for (const m of item.messages) {
        const turn = document.createElement("div"); turn.className = "turn " + m.role;
        const role = document.createElement("span"); role.className = "role"; role.textContent = m.role;
        const text = document.createElement("div"); text.textContent = m.content;
        turn.append(role, text); prompt.append(turn);
      }
    } else { prompt.textContent = item.prompt; }
    document.getElementById("left_text").textContent = item.left_text;
    document.getElementById("right_text").textContent = item.right_text;
  }
}
async function judge(key) {
  if (!item || busy) return;
  busy = true;
  try {
    await fetch("/api/judge", {method: "POST", headers: {"Content-Type": "application/json"},
                               body: JSON.stringify({item_id: item.id, annotator: annotator, key: key, token: token || undefined})});
    await next();
  } finally { busy = false; }
}
document.addEventListener("keydown", e => { if (["1", "2", "t", "s"].includes(e.key) && (annotator || token)) judge(e.key); });
function start() {
  document.getElementById("annot").textContent = "annotator: " + annotator;
  document.getElementById("who").style.display = "none";
  next();
}
document.getElementById("who").addEventListener("submit", e => {
  e.preventDefault(); annotator = document.getElementById("annotator").value.trim();
  if (annotator) { localStorage.setItem("annotator", annotator); start(); }
});
if (annotator || token) start(); else { document.getElementById("task").style.display = "none"; document.getElementById("who").style.display = "block"; }
</script></body></html>
"""


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(store: LabelStore, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """The page and its API. On loopback anyone on this machine may label under an id they type; bound to
    any other interface every request needs an invitation token (`alignflow label invite NAME`), and a
    judgement is stored under the token's annotator, not under an id the request claims."""
    need_token = not is_loopback(host)
    if need_token and not store.has_invitations():
        raise LabelError(f"The page would listen on {host}, where anyone who can reach it could label: invite each "
                         f"annotator first with `alignflow label invite NAME --db {store.path}` and send them the link it prints.")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, code: int, sentence: str) -> None:
            self.reply(code, json.dumps({"error": sentence}).encode())

        def annotator(self, token: str | None, claimed: str) -> str | None:
            """Who is labeling: the token's annotator when a token is given (required off loopback), else the
            id the page sent. Answers the request (403 or 400) and returns None when neither holds."""
            if token:
                who = store.annotator_for(token)
                if who is None:
                    self.error(403, "This link's access token is not valid: ask for a new invitation link.")
                return who
            if need_token:
                self.error(403, "This page needs your invitation link (it carries your access token): ask whoever runs it.")
                return None
            if not claimed.strip():
                self.error(400, "An annotator id is required: open the page as /?annotator=YOUR_NAME.")
                return None
            return claimed

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/":
                return self.reply(200, PAGE.encode(), "text/html; charset=utf-8")
            query = parse_qs(url.query)
            if url.path == "/api/next":
                annotator = self.annotator(query.get("token", [None])[0], query.get("annotator", [""])[0])
                if annotator is None:
                    return
                body = {"item": store.next_item(annotator), "progress": store.progress(annotator), "annotator": annotator}
                return self.reply(200, json.dumps(body).encode())
            if url.path == "/api/agreement":
                if need_token and self.annotator(query.get("token", [None])[0], "") is None:
                    return
                return self.reply(200, json.dumps(store.agreement()).encode())
            self.error(404, f"There is no page {url.path} here: the labeling page is /.")

        def do_POST(self):
            if urlparse(self.path).path != "/api/judge":
                return self.error(404, f"There is nothing to post to at {urlparse(self.path).path}: judgements go to /api/judge.")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self.error(400, "The request has no valid Content-Length.")
            if length > MAX_BODY:
                self.close_connection = True  # the body is not read: the connection cannot carry another request
                return self.error(400, f"The request body is {length} bytes; a judgement is at most {MAX_BODY}.")
            try:
                data = json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                return self.error(400, f"The request body is not JSON. Send {JUDGEMENT}.")
            if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("item_id", "key")):
                return self.error(400, f"A judgement needs item_id, annotator and key, each a string: {JUDGEMENT}.")
            token = data.get("token") if isinstance(data.get("token"), str) else None
            if token is None and not isinstance(data.get("annotator"), str):
                return self.error(400, f"A judgement needs item_id, annotator and key, each a string: {JUDGEMENT}.")
            annotator = self.annotator(token, data.get("annotator") or "")
            if annotator is None:
                return
            try:
                stored = store.record(data["item_id"], annotator, data["key"])
            except LabelError as err:
                return self.error(400, str(err))
            self.reply(200, json.dumps({"stored": stored}).encode())

    return ThreadingHTTPServer((host, port), Handler)


def terminal_session(store: LabelStore, annotator: str, read=input, write=print) -> int:
    """Label in a terminal (for people on ssh). Returns how many judgements were stored."""
    stored = 0
    while (item := store.next_item(annotator)) is not None:
        p = store.progress(annotator)
        write(f"\n[{p['done'] + 1}/{p['total']}] {item['prompt']}\n  1) {item['left_text']}\n  2) {item['right_text']}")
        key = read("better? 1 / 2 / t (tie) / s (skip) / q (quit): ").strip().lower()
        if key == "q":
            break
        if key not in ("1", "2", "t", "s"):
            write("please answer 1, 2, t, s or q")
            continue
        stored += store.record(item["id"], annotator, key)
    return stored
