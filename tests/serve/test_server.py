"""The HTTP service over a real socket: keys guard every route but health and readiness,
limits answer 413/400/429/504 with clear JSON, batched answers equal single ones, streamed
greedy text equals the non-streamed text, /metrics carries the histograms, and the official
openai client works for chat and embeddings."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from lmforge.serve.app import ServeSettings
from tests.serve.conftest import KEY, OTHER_KEY, Running, start

ROUTES = [("GET", "/v1/models", None), ("GET", "/metrics", None),
          ("POST", "/v1/classify", {"input": "good film"}), ("POST", "/v1/ner", {"input": "mr anna in paris"}),
          ("POST", "/v1/qa", {"input": {"question": "what is the code ?", "context": "the code is lima ."}}),
          ("POST", "/v1/embeddings", {"input": "hello"}),
          ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
          ("POST", "/v1/completions", {"prompt": "reverse: anna", "max_tokens": 2})]


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_every_route_but_health_refuses_a_missing_or_wrong_key(server: Running, method: str, path: str,
                                                               body: dict | None) -> None:
    for key in (None, "wrong-key-0123456789abcdef"):
        with server.client(key) as client:
            response = client.request(method, path, json=body)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with server.client(OTHER_KEY) as client:
        assert client.request(method, path, json=body).status_code == 200
    with httpx.Client(base_url=server.url, headers={"X-Api-Key": KEY}) as client:
        assert client.request(method, path, json=body).status_code == 200
    with server.client(None) as client:
        assert client.get("/health").status_code == 200 and client.get("/ready").json()["ready"]


def test_task_routes_answer_in_their_shapes(server: Running) -> None:
    with server.client() as client:
        classes = client.post("/v1/classify", json={"model": "sentiment", "input": ["a good film", "awful"]}).json()
        assert [row["index"] for row in classes["data"]] == [0, 1]
        assert all(row["label"] in ("neg", "pos") and set(row["probabilities"]) == {"neg", "pos"}
                   for row in classes["data"])
        tags = client.post("/v1/ner", json={"input": "mr anna smith in paris"}).json()["data"][0]
        assert len(tags["tags"]) == 5 and "entities" in tags
        answer = client.post("/v1/qa", json={"input": {"question": "what is the code ?",
                                                       "context": "the code is lima . fine day ."}}).json()
        assert isinstance(answer["data"][0]["answer"], str) and "lima" in "the code is lima . fine day ."
        vectors = client.post("/v1/embeddings", json={"input": ["one", "two"]}).json()
        assert len(vectors["data"]) == 2 and abs(sum(v * v for v in vectors["data"][0]["embedding"]) - 1) < 1e-4
        models = {m["id"]: m["route"] for m in client.get("/v1/models").json()["data"]}
        assert models == {"sentiment": "/v1/classify", "tags": "/v1/ner", "reader": "/v1/qa",
                          "embedder": "/v1/embeddings", "chat": "/v1/chat"}
        wrong = client.post("/v1/classify", json={"model": "nope", "input": "x"})
        assert wrong.status_code == 404 and "sentiment" in wrong.json()["error"]["message"]


def test_batched_answers_equal_single_answers(server: Running) -> None:
    texts = [f"the {w} film was {a}" for w in ("long", "short", "new") for a in ("good", "bad", "lovely", "poor")]
    with server.client() as client:
        single = [client.post("/v1/classify", json={"input": t}).json()["data"][0] for t in texts]
        together = client.post("/v1/classify", json={"input": texts}).json()["data"]
        results: list[dict] = [{}] * len(texts)

        def ask(index: int) -> None:
            with server.client() as own:
                results[index] = own.post("/v1/classify", json={"input": texts[index]}).json()["data"][0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for one, batch, concurrent in zip(single, together, results, strict=True):
        assert one["label"] == batch["label"] == concurrent["label"]
        for label, p in one["probabilities"].items():
            assert abs(p - batch["probabilities"][label]) < 1e-5 and abs(p - concurrent["probabilities"][label]) < 1e-5


def test_limits_give_413_and_400_with_counts(server: Running) -> None:
    with server.client() as client:
        big = client.post("/v1/classify", content=b'{"input": "' + b"a" * 1_100_000 + b'"}',
                          headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and "1,000,000" in big.json()["error"]["message"]
        long_text = " ".join(["good"] * 600)
        over = client.post("/v1/classify", json={"input": ["fine", long_text]})
        assert over.status_code == 400
        message = over.json()["error"]["message"]
        assert "input 1 has" in message and "limit" in message
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 100000})
        assert chat.status_code == 400 and "positions" in chat.json()["error"]["message"]
        invalid = client.post("/v1/chat/completions", json={"messages": [], "temperature": 5})
        assert invalid.status_code == 400 and "messages" in invalid.json()["error"]["message"]


def _stream_text(client: httpx.Client, body: dict) -> tuple[str, list[dict]]:
    events = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    text = "".join(c["delta"].get("content", "") for e in events for c in e.get("choices", []))
    return text, events


def test_streamed_greedy_output_equals_the_non_streamed_output(server: Running) -> None:
    for stop in (None, ["anna"], [" b"]):
        body = {"messages": [{"role": "user", "content": "reverse: anna boris chen"}], "max_tokens": 12,
                "temperature": 0, "stop": stop}
        with server.client() as client:
            whole = client.post("/v1/chat/completions", json=body).json()
            text, events = _stream_text(client, body)
        assert text == whole["choices"][0]["message"]["content"]
        streamed_usage, whole_usage = events[-1]["usage"], whole["usage"]
        # the same prompt twice: the second one's first blocks come from the prefix cache
        assert streamed_usage.pop("prompt_tokens_details")["cached_tokens"] > 0
        whole_usage.pop("prompt_tokens_details")
        assert streamed_usage == whole_usage
        if stop:
            assert all(s not in text for s in stop)


def test_metrics_carry_histograms(server: Running) -> None:
    with server.client() as client:
        client.post("/v1/classify", json={"input": "good"})
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                  "temperature": 0})
        text = client.get("/metrics").text
    for name in ("lmforge_request_seconds_bucket", "lmforge_queue_seconds_bucket", "lmforge_batch_size_bucket",
                 "lmforge_time_to_first_token_seconds_bucket", "lmforge_time_per_output_token_seconds_bucket",
                 "lmforge_tokens_in_total", "lmforge_tokens_out_total", "lmforge_queue_depth"):
        assert name in text, name
    assert 'route="/v1/classify",status="200"' in text


def test_the_openai_client_works_for_chat_and_embeddings(server: Running) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "reverse: anna"}],
                                           max_tokens=6, temperature=0)
    streamed = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "reverse: anna"}],
                                              max_tokens=6, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    vectors = client.embeddings.create(model="embedder", input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 64


def test_a_full_queue_answers_429_and_a_slow_request_504(tiny_encoder_dir: Path, tiny_decoder_dir: Path) -> None:
    running = start([f"embedder={tiny_encoder_dir}", f"chat={tiny_decoder_dir}"],
                    ServeSettings(max_queue=2, max_generation_queue=1, request_timeout_s=0.05, batch_wait_ms=50))
    try:
        with running.client() as client:
            full = client.post("/v1/embeddings", json={"input": ["a", "b", "c"]})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            slow = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 200, "temperature": 0})
            assert slow.status_code == 504 and "longer than" in slow.json()["error"]["message"]
    finally:
        running.stop()
