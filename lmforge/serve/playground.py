"""The playground page at ``/``: chat with a decoder (streamed) and try a classifier.

The page is static (no data in it); its calls go to the same API with the key typed into it,
kept in the tab's sessionStorage only.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmforge playground</title>
<style>
  :root { --ink: #1d2433; --muted: #5b6475; --line: #d8dde6; --accent: #2457d6; --soft: #f4f6fa; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); background: #fff; }
  header { display: flex; gap: 16px; align-items: center; padding: 12px 20px; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 18px; margin: 0; }
  header label { margin-left: auto; color: var(--muted); font-size: 13px; }
  main { display: grid; grid-template-columns: 1.4fr 1fr; gap: 20px; padding: 20px; }
  section { border: 1px solid var(--line); border-radius: 8px; padding: 14px; display: flex; flex-direction: column; gap: 10px; }
  h2 { font-size: 15px; margin: 0; }
  select, input, textarea, button { font: inherit; padding: 7px 9px; border: 1px solid var(--line); border-radius: 6px; }
  button { background: var(--accent); color: #fff; border: none; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  #log { min-height: 260px; max-height: 60vh; overflow: auto; background: var(--soft); border-radius: 6px; padding: 10px; }
  .turn { margin: 0 0 10px; white-space: pre-wrap; }
  .turn b { color: var(--muted); font-weight: 600; margin-right: 6px; }
  .row { display: flex; gap: 8px; }
  .row > :first-child { flex: 1; }
  table { border-collapse: collapse; width: 100%; }
  td, th { text-align: left; padding: 5px 6px; border-bottom: 1px solid var(--line); }
  .bar { height: 8px; background: var(--accent); border-radius: 4px; }
  .error { color: #b3261e; }
  .meta { color: var(--muted); font-size: 12px; }
</style>
</head>
<body>
<header><h1>lmforge playground</h1>
  <label>API key <input id="key" type="password" placeholder="Bearer key" autocomplete="off"></label></header>
<main>
  <section id="chat">
    <h2>Chat</h2>
    <select id="chat-model"></select>
    <div id="log" aria-live="polite"></div>
    <div class="row"><textarea id="prompt" rows="2" placeholder="Write a message"></textarea>
      <button id="send">Send</button></div>
    <div class="meta" id="chat-meta"></div>
  </section>
  <section id="classify">
    <h2>Classify</h2>
    <select id="classify-model"></select>
    <div class="row"><input id="text" placeholder="A text to classify"><button id="run">Classify</button></div>
    <table id="result"><tbody></tbody></table>
  </section>
</main>
<script>
const $ = (id) => document.getElementById(id);
$("key").value = sessionStorage.getItem("lmforge-key") || "";
$("key").addEventListener("change", () => { sessionStorage.setItem("lmforge-key", $("key").value); loadModels(); });
const headers = () => ({"Content-Type": "application/json", "Authorization": "Bearer " + $("key").value});
const history = [];

async function loadModels() {
  const response = await fetch("/v1/models", {headers: headers()});
  if (!response.ok) { $("chat-meta").textContent = "enter an API key to list the models"; return; }
  const models = (await response.json()).data;
  for (const [select, route] of [["chat-model", "/v1/chat"], ["classify-model", "/v1/classify"]]) {
    $(select).innerHTML = "";
    for (const m of models.filter((m) => m.route === route)) {
      const option = document.createElement("option"); option.value = option.textContent = m.id; $(select).append(option);
    }
  }
  $("chat-meta").textContent = models.length + " model(s) served";
}

function addTurn(role, text) {
  const div = document.createElement("p"); div.className = "turn";
  const who = document.createElement("b"); who.textContent = role;
  const body = document.createElement("span"); body.textContent = text;
  div.append(who, body); $("log").append(div); $("log").scrollTop = 1e9; return body;
}

$("send").addEventListener("click", async () => {
  const content = $("prompt").value.trim(); if (!content) return;
  $("prompt").value = ""; $("send").disabled = true;
  history.push({role: "user", content}); addTurn("you", content);
  const out = addTurn("model", ""); const started = performance.now(); let first = null;
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify({model: $("chat-model").value, messages: history, stream: true, max_tokens: 128,
                            temperature: 0.7})});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader(); const decoder = new TextDecoder(); let buffer = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\\n\\n"); buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, ""); if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            if (first === null) first = performance.now();
            out.textContent += choice.delta.content;
          }
        }
        if (chunk.usage) $("chat-meta").textContent = chunk.usage.completion_tokens + " tokens; first after " +
          Math.round((first || performance.now()) - started) + " ms";
      }
    }
    history.push({role: "assistant", content: out.textContent});
  } catch (error) { out.className = "error"; out.textContent = String(error.message || error); }
  $("send").disabled = false;
});

$("run").addEventListener("click", async () => {
  const body = $("result").tBodies[0]; body.innerHTML = "";
  const response = await fetch("/v1/classify", {method: "POST", headers: headers(),
    body: JSON.stringify({model: $("classify-model").value, input: $("text").value})});
  const answer = await response.json();
  if (!response.ok) {
    body.innerHTML = "<tr><td class=error></td></tr>";
    body.querySelector("td").textContent = answer.error.message;
    return;
  }
  const row = answer.data[0];
  for (const [label, p] of Object.entries(row.probabilities || {})) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td style='width:55%'><div class=bar></div></td><td></td>";
    tr.children[0].textContent = label + (label === row.label ? " \\u2714" : "");
    tr.querySelector(".bar").style.width = Math.round(100 * p) + "%";
    tr.children[2].textContent = p.toFixed(3); body.append(tr);
  }
});
loadModels();
</script>
</body>
</html>
"""
