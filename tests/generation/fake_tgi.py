"""A small HTTP server that speaks Text Generation Inference's documented API, backed by a tiny HF model.

Routes (the schema of TGI's OpenAPI spec): GET /info; POST /generate -> {"generated_text", "details": {...}};
POST /generate_stream -> server-sent events ``data:{"token": {...}, "generated_text", "details"}``; POST / ->
either, by the request's ``stream`` flag (TGI's compat route, which the ``text-generation`` client calls, answering
a list for non-streamed calls). Errors as TGI sends them: 422 {"error", "error_type": "validation"}, 429 overloaded.

Sampling is written independently of rlhf.generation: transformers' logits warpers (temperature, top-k, top-p),
torch.multinomial with a generator seeded from the request's seed; the logprob of a token is taken from the
warped distribution, as TGI does.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


class FakeTGI:
    def __init__(self, model, tokenizer, max_new_tokens: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.overloaded = False
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ---- generation -------------------------------------------------------------------------------------

    def validate(self, body: dict) -> str | None:
        params = body.get("parameters") or {}
        if not body.get("inputs"):
            return "`inputs` cannot be empty"
        if params.get("max_new_tokens", 20) > self.max_new_tokens:
            return f"`max_new_tokens` must be <= {self.max_new_tokens}"
        if params.get("temperature") is not None and params["temperature"] <= 0:
            return "`temperature` must be strictly positive"
        return None

    def steps(self, body: dict):
        """Yield (token id, logprob, finish reason or None) per generated token."""
        params = body.get("parameters") or {}
        ids = self.tokenizer(body["inputs"], add_special_tokens=False)["input_ids"]
        warpers = LogitsProcessorList()
        if params.get("do_sample"):
            if params.get("temperature"):
                warpers.append(TemperatureLogitsWarper(params["temperature"]))
            if params.get("top_k"):
                warpers.append(TopKLogitsWarper(params["top_k"]))
            if params.get("top_p"):
                warpers.append(TopPLogitsWarper(params["top_p"]))
        generator = torch.Generator()
        generator.manual_seed(params["seed"]) if params.get("seed") is not None else generator.seed()
        stops = params.get("stop") or []
        generated: list[int] = []
        for _ in range(params.get("max_new_tokens", 20)):
            with torch.no_grad(), self.lock:
                logits = self.model(torch.tensor([ids + generated])).logits[:, -1].float()
            scores = warpers(torch.tensor([ids + generated]), logits)
            logp = torch.log_softmax(scores, -1)[0]
            if params.get("do_sample"):
                token = int(torch.multinomial(logp.exp(), 1, generator=generator))
            else:
                token = int(torch.argmax(logits[0]))
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            finish = None
            if token == self.tokenizer.eos_token_id:
                finish = "eos_token"
            elif any(s in text for s in stops):
                finish = "stop_sequence"
            elif len(generated) == params.get("max_new_tokens", 20):
                finish = "length"
            yield token, float(logp[token]), finish
            if finish:
                return

    def token_json(self, token: int, logprob: float) -> dict:
        return {
            "id": token,
            "text": self.tokenizer.decode([token]),
            "logprob": logprob,
            "special": token in self.tokenizer.all_special_ids,
        }

    def generate(self, body: dict) -> dict:
        tokens, finish = [], "length"
        for token, logprob, reason in self.steps(body):
            tokens.append(self.token_json(token, logprob))
            finish = reason or finish
        params = body.get("parameters") or {}
        return {
            "generated_text": self.tokenizer.decode([t["id"] for t in tokens], skip_special_tokens=True),
            "details": {
                "finish_reason": finish,
                "generated_tokens": len(tokens),
                "seed": params.get("seed"),
                "prefill": [],
                "tokens": tokens,
            },
        }

    def stream(self, body: dict):
        ids = []
        for token, logprob, finish in self.steps(body):
            ids.append(token)
            event = {"token": self.token_json(token, logprob), "generated_text": None, "details": None}
            if finish:
                event["generated_text"] = self.tokenizer.decode(ids, skip_special_tokens=True)
                event["details"] = {"finish_reason": finish, "generated_tokens": len(ids), "seed": None}
            yield event

    # ---- HTTP -------------------------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path != "/info":
                    return self._json(404, {"error": "not found"})
                self._json(
                    200,
                    {
                        "model_id": "fake/tiny-llama",
                        "model_dtype": "torch.float32",
                        "max_input_tokens": 512,
                        "max_total_tokens": 1024,
                        "version": "fake-tgi",
                    },
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.requests.append(body)
                if self.path not in ("/", "/generate", "/generate_stream"):
                    return self._json(404, {"error": "not found"})
                if fake.overloaded:
                    return self._json(429, {"error": "Model is overloaded", "error_type": "overloaded"})
                problem = fake.validate(body)
                if problem:
                    return self._json(422, {"error": problem, "error_type": "validation"})
                streamed = self.path == "/generate_stream" or (self.path == "/" and body.get("stream"))
                if not streamed:
                    result = fake.generate(body)
                    return self._json(200, [result] if self.path == "/" else result)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for event in fake.stream(body):
                    self.wfile.write(b"data:" + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
                self.close_connection = True

        return Handler
