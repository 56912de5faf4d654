"""The support assistant inside `lmforge serve --app support KB`: routes behind the server's
keys, body limits, timeouts and metrics, and a chat page.

    GET  /apps/support                     the support-chat page (static; calls the API with a typed key)
    GET  /v1/apps/support/info             entries, categories, fusion weight, handoff threshold
    POST /v1/apps/support/chat             {"message", "session_id"?, "generate"?} -> answer + session_id
    POST /v1/apps/support/ask              {"question", "history"?: [...]} (no session kept)
    GET  /v1/apps/support/handoffs         the latest handoffs ({"limit"} query parameter)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from lmforge.apps.http import add_page, loaded
from lmforge.apps.support import Assistant, GroundedWriter, KnowledgeBase

MAX_MESSAGE_CHARS = 2000


class ChatBody(BaseModel):
    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    session_id: str | None = Field(default=None, max_length=64)
    generate: bool = False


class AskBody(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    history: list[str] = Field(default_factory=list, max_length=20)


class SupportApp:
    """The knowledge base, its sessions and the optional grounded writer, as a server extension."""

    name = "support"
    pages = ("/apps/support",)

    def __init__(self, kb: str | Path, generator: str | Path | None = None, log_dir: str | Path | None = None) -> None:
        self.kb_path, self.generator_path = Path(kb), generator
        self.log_dir = Path(log_dir) if log_dir else self.kb_path / "logs"
        self.assistant: Assistant | None = None

    def load(self) -> None:
        kb = KnowledgeBase.load(self.kb_path)
        writer = GroundedWriter.load(self.generator_path) if self.generator_path else None
        kb.ask("warm-up question")  # first forward pass outside any request
        self.assistant = Assistant(kb, writer, self.log_dir)

    def mount(self, app: FastAPI, server: Any) -> None:
        from lmforge.serve.app import ApiError

        def assistant() -> Assistant:
            return loaded(self.assistant, "knowledge base")

        add_page(app, "/apps/support", PAGE)

        @app.get("/v1/apps/support/info")
        async def info() -> dict[str, Any]:
            kb = assistant().kb
            return {"entries": len(kb.entries), "categories": kb.settings.get("categories") or [],
                    "alpha": kb.alpha, "threshold": kb.threshold, "generator": assistant().writer is not None,
                    "built": kb.settings.get("built"), "faq": kb.settings["faq"]["provenance"]}

        @app.post("/v1/apps/support/chat")
        async def chat(body: ChatBody) -> dict[str, Any]:
            helper = assistant()
            if body.generate and helper.writer is None:
                raise ApiError(400, "generate: this server has no --generator decoder")
            return await server.offload(helper.chat, body.message, body.session_id, body.generate)  # type: ignore[no-any-return]

        @app.post("/v1/apps/support/ask")
        async def ask(body: AskBody) -> dict[str, Any]:
            return await server.offload(assistant().kb.ask, body.question, body.history)  # type: ignore[no-any-return]

        @app.get("/v1/apps/support/handoffs")
        async def handoffs(limit: int = 50) -> dict[str, Any]:
            return {"data": assistant().handoffs(max(1, min(limit, 1000)))}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge support</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:14px;align-items:center}
 header h1{font-size:17px;margin:0;font-weight:600} header .meta{opacity:.75;font-size:13px}
 header input{margin-left:auto;padding:5px 8px;border-radius:4px;border:0;width:220px}
 main{max-width:860px;margin:18px auto;padding:0 14px}
 #log{background:#fff;border-radius:8px;padding:14px;min-height:340px;box-shadow:0 1px 3px #0002}
 .turn{margin:8px 0;display:flex} .turn.user{justify-content:flex-end}
 .bubble{max-width:78%;padding:9px 12px;border-radius:12px;white-space:pre-wrap}
 .user .bubble{background:#2f6fed;color:#fff} .bot .bubble{background:#eef0f4}
 .bot.handoff .bubble{background:#fff4e0;border:1px solid #f0b34a}
 .source{font-size:12px;color:#5a6275;margin-top:5px} .tag{display:inline-block;background:#dde3ee;border-radius:8px;
 padding:0 7px;margin-right:6px;font-size:12px} .error .bubble{background:#fde8e8;color:#8a1c1c}
 form{display:flex;gap:8px;margin-top:12px} #message{flex:1;padding:10px;border-radius:6px;border:1px solid #c9ced8}
 button{padding:10px 16px;border:0;border-radius:6px;background:#2f6fed;color:#fff;cursor:pointer}
 button:disabled{opacity:.5} label{font-size:13px;display:flex;align-items:center;gap:4px}
</style></head><body>
<header><h1>Support assistant</h1><span class="meta" id="kb-meta">loading...</span>
<input id="key" type="password" placeholder="API key (if the server has keys)"></header>
<main><div id="log"></div>
<form id="ask"><input id="message" autocomplete="off" placeholder="Ask a question in your own words">
<label><input type="checkbox" id="generate"> write answer</label><button id="send">Send</button></form>
<p class="source">Answers come from the company FAQ. Low-confidence questions are passed to a person.</p></main>
<script>
let session = null;
const headers = () => { const k = document.getElementById('key').value.trim();
  return Object.assign({'Content-Type': 'application/json'}, k ? {'Authorization': 'Bearer ' + k} : {}); };
function add(role, text, extra) {
  const turn = document.createElement('div'); turn.className = 'turn ' + role;
  const bubble = document.createElement('div'); bubble.className = 'bubble'; bubble.textContent = text;
  if (extra) bubble.appendChild(extra);
  turn.appendChild(bubble); document.getElementById('log').appendChild(turn); return turn; }
async function info() {
  const r = await fetch('/v1/apps/support/info', {headers: headers()});
  const meta = document.getElementById('kb-meta');
  if (!r.ok) { meta.textContent = 'enter the API key'; return; }
  const d = await r.json(); meta.textContent = d.entries + ' FAQ entries, ' + d.categories.length + ' categories';
  document.getElementById('generate').disabled = !d.generator; }
document.getElementById('key').addEventListener('change', info);
document.getElementById('ask').addEventListener('submit', async (event) => {
  event.preventDefault();
  const box = document.getElementById('message'), text = box.value.trim(); if (!text) return;
  const send = document.getElementById('send'); send.disabled = true; box.value = '';
  add('user', text);
  try {
    const r = await fetch('/v1/apps/support/chat', {method: 'POST', headers: headers(), body: JSON.stringify(
      {message: text, session_id: session, generate: document.getElementById('generate').checked})});
    const d = await r.json();
    if (!r.ok) { add('bot error', d.error ? d.error.message : ('HTTP ' + r.status)); return; }
    session = d.session_id;
    const source = document.createElement('div'); source.className = 'source';
    if (d.handoff) { source.textContent = 'handed off to a person (confidence ' + d.score.toFixed(2) + ')'; }
    else {
      const cat = d.category ? d.category.label : (d.entry.category || '');
      source.innerHTML = '<span class="tag"></span><span class="q"></span>';
      source.querySelector('.tag').textContent = cat;
      source.querySelector('.q').textContent = 'FAQ: ' + d.entry.question + ' (score ' + d.score.toFixed(2) + ')'; }
    add('bot' + (d.handoff ? ' handoff' : ''), d.answer, source);
  } catch (error) { add('bot error', String(error)); }
  finally { send.disabled = false; box.focus(); } });
info();
</script></body></html>
"""
