"""Serving benchmark: bounded load on 127.0.0.1, every side in one run (docs/serving.md).

1. Classification with a MiniLM-L6 classifier at 32 concurrent clients, 20 s each side:
   lmforge serve (dynamic batching) / lmforge with batching off (max_batch 1) / a transformers
   ``pipeline("text-classification")`` behind the same FastAPI, on the same weights
   (exported with ``lmforge export --format hf``). Throughput and p50/p95/p99 latency.
2. Chat with SmolLM2-135M-Instruct: one stream alone, then 4 concurrent streams (continuous
   batching): time to first token p50 and aggregate tokens/s.

    python benchmarks/serve.py --classifier runs/compression/teacher [--seconds 20] [--part classify|chat|all]

Every request loop is bounded in count and time and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import smollm2_path  # noqa: E402

from lmforge.hardware import cpu_flags, cpu_name  # noqa: E402
from lmforge.serve import wait_until_ready  # noqa: E402
from lmforge.serve.app import ServeSettings, create_app  # noqa: E402

TEXTS = ["the service was quick and friendly", "worst delivery ever, never again", "it is ok I guess",
         "absolutely loved the new update", "my order arrived broken", "meeting at noon tomorrow"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Background:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until_ready(self.url, 300, alive=self.thread.is_alive)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def transformers_app(folder: Path) -> Any:
    """The reference: transformers' pipeline behind FastAPI, one request at a time per call."""
    from fastapi import FastAPI
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(folder), device=-1, top_k=None)
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/classify")
    async def classify(body: dict[str, Any]) -> dict[str, Any]:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        results = await asyncio.to_thread(classifier, texts)
        return {"data": results}

    return app


async def load(url: str, clients: int, seconds: float, body_of: Any, path: str) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(index: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            count = 0
            while time.perf_counter() < stop_at and count < 10_000:
                start = time.perf_counter()
                response = await http.post(path, json=body_of(index, count))
                if response.status_code != 200:
                    errors += 1
                latencies.append(time.perf_counter() - start)
                count += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {"requests_per_s": round(len(latencies) / elapsed, 1), "p50_ms": round(quantile(0.5), 1),
            "p95_ms": round(quantile(0.95), 1), "p99_ms": round(quantile(0.99), 1), "errors": errors,
            "requests": len(latencies)}


def classification(run: Path, seconds: float, clients: int = 32) -> list[dict[str, Any]]:
    from lmforge.deploy import export_model

    hf = ROOT / "runs" / "serve-bench" / "classifier-hf"
    if not hf.exists():
        export_model(run, "hf", hf)
    rows = []
    sides = [("lmforge (dynamic batching)", lambda: create_app([f"clf={run}"], None, ServeSettings())),
             ("lmforge (batching off)", lambda: create_app([f"clf={run}"], None, ServeSettings(max_batch=1))),
             ("transformers pipeline + FastAPI", lambda: transformers_app(hf))]
    for name, make in sides:
        server = Background(make())
        try:
            result = asyncio.run(load(server.url, clients, seconds,
                                      lambda i, n: {"input": TEXTS[(i + n) % len(TEXTS)]}, "/v1/classify"))
        finally:
            server.stop()
        rows.append({"side": name, **result})
        print(rows[-1], flush=True)
    return rows


async def chat_streams(url: str, streams: int, tokens: int) -> dict[str, float]:
    first: list[float] = []
    produced = 0

    async def one(index: int) -> None:
        nonlocal produced
        body = {"messages": [{"role": "user", "content": f"Tell me about topic number {index}."}],
                "max_tokens": tokens, "temperature": 0, "stream": True}
        seen = False
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            start = time.perf_counter()
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    content = any(c.get("delta", {}).get("content") for c in event.get("choices", []))
                    if content and not seen:
                        seen = True
                        first.append(time.perf_counter() - start)
                    if event.get("usage"):
                        produced += event["usage"]["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.perf_counter() - started
    return {"streams": streams, "ttft_p50_ms": round(statistics.median(first) * 1000, 1),
            "tokens_per_s": round(produced / elapsed, 1), "tokens": produced}


def chat(tokens: int = 64) -> list[dict[str, Any]]:
    server = Background(create_app([f"chat={smollm2_path()}"], None, ServeSettings()))
    try:
        asyncio.run(chat_streams(server.url, 1, 8))  # warm
        rows = [asyncio.run(chat_streams(server.url, n, tokens)) for n in (1, 4)]
    finally:
        server.stop()
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", help="a fine-tuned MiniLM classifier run (needed for --part classify|all)")
    parser.add_argument("--part", choices=("classify", "chat", "all"), default="all")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "serving.json"))
    args = parser.parse_args()
    if args.part != "chat" and not args.classifier:
        parser.error("--classifier is needed for the classification part")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() and args.part != "all" else {}
    machine = {"cpu": cpu_name(), "flags": cpu_flags(), "threads": torch.get_num_threads()}
    results["machine" if args.part == "all" else f"machine_{args.part}"] = machine  # parts may run on other CPUs
    if args.part in ("classify", "all"):
        results["classification"] = classification(Path(args.classifier), args.seconds)
    if args.part in ("chat", "all"):
        results["chat"] = chat()
    out.write_text(json.dumps(results, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
