"""The recommender inside `lmforge serve --app recommend REC`: routes behind the server's keys,
limits and metrics, and a page.

    GET /apps/recommend                         the page (static; calls the API with a typed key)
    GET /v1/apps/recommend/info                 users, items, split, weights
    GET /v1/apps/recommend/user/{user}?n=10     the user's recent items and recommendations
    GET /v1/apps/recommend/similar/{item}?n=10  items like one item
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query

from lmforge.apps.http import add_page, loaded
from lmforge.apps.recommend import Recommender


class RecommendApp:
    """A REC folder as a server extension."""

    name = "recommend"
    pages = ("/apps/recommend",)

    def __init__(self, rec: str | Path) -> None:
        self.rec_path = Path(rec)
        self.rec: Recommender | None = None

    def load(self) -> None:
        self.rec = Recommender.load(self.rec_path)

    def mount(self, app: FastAPI, server: Any) -> None:
        def rec() -> Recommender:
            return loaded(self.rec, "recommender")

        add_page(app, "/apps/recommend", PAGE)

        @app.get("/v1/apps/recommend/info")
        async def info() -> dict[str, Any]:
            settings = rec().settings
            return {"users": settings["data"]["users"], "items": settings["data"]["item_count"],
                    "split": settings["split"], "alpha": settings["alpha"], "data": settings["data"]["provenance"],
                    "example_user": next(iter(rec().catalogue.histories))}

        @app.get("/v1/apps/recommend/user/{user}")
        async def for_user(user: str, n: int = Query(10, ge=1, le=100)) -> dict[str, Any]:
            return await server.offload(rec().for_user, user, n)  # type: ignore[no-any-return]

        @app.get("/v1/apps/recommend/similar/{item}")
        async def similar(item: str, n: int = Query(10, ge=1, le=100)) -> dict[str, Any]:
            return await server.offload(rec().similar, item, n)  # type: ignore[no-any-return]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge recommend</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:14px;align-items:center}
 header h1{font-size:17px;margin:0;font-weight:600} header .meta{opacity:.75;font-size:13px}
 header input{margin-left:auto;padding:5px 8px;border-radius:4px;border:0;width:220px}
 main{max-width:980px;margin:18px auto;padding:0 14px} form{display:flex;gap:8px;margin-bottom:14px}
 input.id{padding:8px;border-radius:6px;border:1px solid #c9ced8;width:140px}
 button{padding:8px 14px;border:0;border-radius:6px;background:#2f6fed;color:#fff;cursor:pointer}
 .cols{display:grid;grid-template-columns:1fr 1fr;gap:16px} section{background:#fff;border-radius:8px;
 padding:12px 14px;box-shadow:0 1px 3px #0002} h2{font-size:15px;margin:0 0 8px}
 ol{margin:0;padding-left:22px} li{margin:4px 0} li a{color:#1d2330;text-decoration:none;cursor:pointer}
 li a:hover{text-decoration:underline} .pop{color:#5a6275;font-size:12px} #error{color:#8a1c1c}
</style></head><body>
<header><h1>Recommendations</h1><span class="meta" id="meta">loading...</span>
<input id="key" type="password" placeholder="API key (if the server has keys)"></header>
<main><form id="ask"><input class="id" id="user" placeholder="user id"><button id="go">Recommend</button>
<span id="error"></span></form>
<div class="cols"><section><h2 id="left-title">Recently liked</h2><ol id="history"></ol></section>
<section><h2 id="right-title">Recommended</h2><ol id="items"></ol></section></div>
<p class="pop">Click an item to see items like it (text and co-occurrence).</p></main>
<script>
const headers = () => { const k = document.getElementById('key').value.trim();
  return k ? {'Authorization': 'Bearer ' + k} : {}; };
function fill(id, items) {
  const list = document.getElementById(id); list.innerHTML = '';
  for (const it of items) {
    const li = document.createElement('li'), a = document.createElement('a');
    a.textContent = it.text; a.dataset.item = it.item; a.addEventListener('click', () => similar(it.item));
    const pop = document.createElement('span'); pop.className = 'pop'; pop.textContent = '  ' + it.popularity + ' users';
    li.appendChild(a); li.appendChild(pop); list.appendChild(li); } }
async function call(path) {
  const r = await fetch(path, {headers: headers()}); const d = await r.json();
  document.getElementById('error').textContent = r.ok ? '' : (d.error ? d.error.message : 'HTTP ' + r.status);
  return r.ok ? d : null; }
async function info() {
  const d = await call('/v1/apps/recommend/info'); if (!d) return;
  document.getElementById('meta').textContent = d.users + ' users, ' + d.items + ' items';
  if (!document.getElementById('user').value) document.getElementById('user').value = d.example_user; }
async function similar(item) {
  const d = await call('/v1/apps/recommend/similar/' + encodeURIComponent(item) + '?n=10'); if (!d) return;
  document.getElementById('left-title').textContent = 'Item'; fill('history', [d.item]);
  document.getElementById('right-title').textContent = 'Similar items'; fill('items', d.items); }
document.getElementById('key').addEventListener('change', info);
document.getElementById('ask').addEventListener('submit', async (event) => {
  event.preventDefault();
  const user = document.getElementById('user').value.trim(); if (!user) return;
  const d = await call('/v1/apps/recommend/user/' + encodeURIComponent(user) + '?n=10'); if (!d) return;
  document.getElementById('left-title').textContent = 'Recently liked by ' + d.user; fill('history', d.history);
  document.getElementById('right-title').textContent = 'Recommended (' + d.how + ')'; fill('items', d.items); });
info();
</script></body></html>
"""
