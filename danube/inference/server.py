"""An OpenAI-compatible HTTP API over a danube checkpoint (launchers/serve.py).

FastAPI routes on uvicorn's event loop; one engine thread owns the model and runs megatron-core's
static inference engine (danube.inference.generate) and the scorer (danube.inference.score).
What the routes accept and answer follows the OpenAI API as vLLM serves it:

  GET  /v1/models, /health (503 while the checkpoint loads), /tokenizer_info
  POST /v1/chat/completions   messages rendered with the checkpoint's chat template, the answer
                              ends at the model's EOS / end of turn or a template marker
  POST /v1/completions        prompt text or token ids (one or a list); `echo` and `logprobs`
                              score the prompt, so log-likelihood clients (lm-eval) work
  POST /tokenize, /detokenize the checkpoint's tokenizer (lm-eval's remote tokenizer uses them)

Batching: requests waiting when the engine thread is free are run together, one engine call
per group of requests that sample alike (greedy, same max_tokens and stop strings); a sampled
request runs alone, so a seed gives the same answer whatever else arrives. Requests asking
for greedy `max_tokens` <= 1 (what lm-eval's log-likelihood requests are) are answered by the
scorer's single forward pass, batched across requests.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 a field we do
not know or of the wrong type, a prompt too long for the context, a template that refuses the
messages; 401 a wrong API key; 404 an unknown model; 413 a body over the limit; 422 a value
out of range or a feature we do not implement (named); 429 more requests in flight than
allowed; 503 while loading. A client that goes away (mid-stream, or before a non-streamed
answer) frees its place and, when nobody else shares its engine call, stops the generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from danube.inference.generate import Cancelled, Generation, Sampling, generate
from danube.inference.model import InferenceError, InferenceModel

log = logging.getLogger("danube.serve")

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


# --- requests ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, List[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


def _neutral(name: str, value: Any, neutral: Any) -> Any:
    if value is not None and value != neutral:
        raise ValueError(f"{name}={value!r} is not implemented by this server "
                         f"(leave it out or {neutral!r})")
    return value


class _Sampled(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="vLLM's extension: -1 or 0 = no top-k")
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = 0.0
    presence_penalty: Optional[float] = 0.0

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value}: one choice per request here (send {value} requests, "
                             "with different seeds)")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, value, info):
        return _neutral(info.field_name, value, 0.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @model_validator(mode="after")
    def _sampler(self):
        if self.temperature > 0 and self.top_k > 0 and self.top_p < 1.0:
            raise ValueError("top_k and top_p together: megatron-core's sampler takes one or the "
                             "other (leave top_p at 1 or top_k at -1)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options without stream: true")
        return self

    def sampling(self, max_tokens: int) -> Sampling:
        seed = self.seed if self.seed is not None else random.randrange(2 ** 31)
        return Sampling(max_new_tokens=max(max_tokens, 1), temperature=self.temperature,
                        top_k=max(self.top_k, 0) if self.temperature > 0 else 0,
                        top_p=self.top_p if self.temperature > 0 and self.top_p < 1 else 0.0,
                        seed=seed, stop=tuple(self.stop or ()))


class ChatRequest(_Sampled):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _chat(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_tokens and max_completion_tokens: give one")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream and self.logprobs:
            raise ValueError("logprobs are returned by non-streamed requests only")
        return self


class CompletionRequest(_Sampled):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value):
        return _neutral("best_of", value, 1)

    @model_validator(mode="after")
    def _completion(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: an empty list")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 generates nothing: use it with echo (to score the "
                             "prompt)")
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError("echo and logprobs are returned by non-streamed requests only")
        return self

    def prompts(self) -> List[Union[str, List[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TokenizeRequest(_Strict):
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    model: Optional[str] = None


class DetokenizeRequest(_Strict):
    tokens: List[int]
    model: Optional[str] = None


# --- errors -----------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.param)


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": kind, "param": param, "code": status}})


# pydantic error types that mean "the request's shape is wrong" (400); the rest are values out
# of range or refused features (422)
_SHAPE_ERRORS = {"extra_forbidden", "missing", "json_invalid", "model_attributes_type",
                 "model_type", "union_tag_invalid", "list_type", "dict_type"}


def validation_response(error: RequestValidationError) -> JSONResponse:
    problems, status = [], 422
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        kind = item.get("type", "")
        if kind in _SHAPE_ERRORS or kind.endswith("_type") or kind.endswith("_parsing"):
            status = 400
        message = item.get("msg", "")
        if kind == "extra_forbidden":
            message = "unknown field (not part of this server's API)"
        problems.append(f"{where or 'body'}: {message}")
    first = error.errors()[0] if error.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return error_response(status, "; ".join(dict.fromkeys(problems)), param=param)


# --- the engine thread ------------------------------------------------------------------------
@dataclass
class Job:
    prompt: List[int]
    max_tokens: int
    sampling: Sampling
    logprobs: Optional[int] = None  # top-n; 0 = the chosen tokens' only; None = none
    echo: bool = False
    on_text: Optional[Callable[[str], None]] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)

    @property
    def scored_only(self) -> bool:
        """Answered by one forward pass: nothing to generate, or one greedy token."""
        return self.on_text is None and (
            self.max_tokens == 0 or (self.max_tokens == 1 and self.sampling.greedy))

    def group_key(self):
        if self.scored_only:
            return ("score",)
        if not self.sampling.greedy:
            return ("alone", id(self))
        return ("greedy", self.max_tokens, tuple(self.sampling.stop))


@dataclass
class Result:
    tokens: List[int]  # generated (EOS included when it ended there)
    text: str
    finish: str  # "stop" | "length"
    scores: Optional[Any] = None  # danube.inference.score.Scored of prompt + generated


class Engine:
    """The model in one thread: jobs in, results out through their futures."""

    def __init__(self, load: Callable[[], Any], max_batch: int, linger_s: float = 0.01):
        self._load = load  # -> a context manager yielding an InferenceModel
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.im: Optional[InferenceModel] = None
        self.template = None  # the checkpoint's ChatTemplate, set with `im`
        self.state = "loading"
        self.error: Optional[BaseException] = None
        self.started = time.monotonic()
        self.created = int(time.time())
        self.ready = threading.Event()
        self.running = 0  # jobs in the engine call under way
        self.largest_batch = {"generate": 0, "score": 0}  # the most jobs run together
        self.thread = threading.Thread(target=self._main, name="danube-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def _main(self) -> None:
        from danube import cpu_compat

        try:
            # megatron needs the CPU patches in this thread: entered here when another thread
            # applied them, applied here by the load otherwise
            with cpu_compat.in_this_thread(), self._load() as im:
                from danube.data.chat import ChatTemplate

                self.im, self.template = im, ChatTemplate.for_tokenizer(im.tokenizer)
                self.state = "ready"
                self.ready.set()
                self._serve()
        except BaseException as error:  # noqa: BLE001 - reported by the launcher, then exit
            self.error = error
            self.state = "failed"
            self.ready.set()

    def _serve(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            if self.linger_s:
                time.sleep(self.linger_s)  # let requests sent together arrive together
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)
                    break
                jobs.append(job)
            groups: Dict[Any, List[Job]] = {}
            for job in jobs:
                if job.cancelled.is_set():
                    job.future.set_exception(Cancelled())
                else:
                    groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                self.running = len(group)
                kind = "score" if group[0].scored_only else "generate"
                self.largest_batch[kind] = max(self.largest_batch[kind], len(group))
                try:
                    self._run(group)
                except Cancelled:
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(Cancelled())
                except Exception as error:  # noqa: BLE001 - the request fails, the server stays
                    log.exception("engine call failed")
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(error)
                finally:
                    self.running = 0

    def _run(self, group: List[Job]) -> None:
        from danube.inference.score import score

        im = self.im
        top_n = max((j.logprobs or 0) for j in group)
        if group[0].scored_only:
            scored = score(im, [j.prompt for j in group], top_n=top_n, batch=self.max_batch)
            for job, s in zip(group, scored):
                tokens: List[int] = []
                if job.max_tokens == 1:
                    tokens = [int(s.next_logprobs.argmax())]
                    s = _extend(s, tokens[0], job.logprobs or 0)
                job.future.set_result(_finished(im, job, tokens, s))
            return
        sampling = group[0].sampling
        results: List[Generation] = generate(
            im, [j.prompt for j in group], sampling, batch=len(group),
            on_texts=[j.on_text for j in group],
            cancelled=lambda: all(j.cancelled.is_set() for j in group))
        wanted = [j for j in group if j.logprobs is not None]
        scores = {}
        if wanted:
            seqs = [j.prompt + r.tokens for j, r in zip(group, results) if j.logprobs is not None]
            for job, s in zip(wanted, score(im, seqs, top_n=top_n, batch=self.max_batch)):
                scores[id(job)] = s
        for job, r in zip(group, results):
            job.future.set_result(Result(r.tokens, r.text, "length" if r.finish == "length"
                                         else "stop", scores.get(id(job))))


def _extend(scored, token: int, top_n: int):
    """A Scored of the prompt + the one greedy token chosen from its next-token scores."""
    from danube.inference.score import Scored

    nxt = scored.next_logprobs
    top = []
    if top_n > 0:
        values, indices = nxt.topk(top_n)
        top = list(zip(indices.tolist(), values.tolist()))
    return Scored(scored.token_logprobs + [float(nxt[token])], scored.top + [top], nxt)


def _finished(im: InferenceModel, job: Job, tokens: List[int], scored) -> Result:
    from danube.inference.generate import cut_at_stop

    eos = im.tokenizer.eos
    if tokens and tokens[-1] == eos:
        return Result(tokens, "", "stop", scored)
    text, found = cut_at_stop(im.tokenizer.detokenize(tokens), job.sampling.stop)
    return Result(tokens, text, "stop" if found else "length", scored)


# --- the app ----------------------------------------------------------------------------------
@dataclass
class ServeOptions:
    name: str
    max_batch: int = 8
    max_pending: int = 64
    max_body_bytes: int = 1 << 20
    api_key: Optional[str] = None


class _BodyTooLarge(Exception):
    pass


_ENGINE_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


class Gate:
    """What every request passes before its route (plain ASGI, so that a streamed response's
    disconnect reaches its generator): the API key, 503 until the model is ready, 413 for a
    body over the limit (at once from Content-Length, else while it arrives)."""

    def __init__(self, app, engine: "Engine", options: "ServeOptions"):
        self.app, self.engine, self.options = app, engine, options

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        limit, seen = self.options.max_body_bytes, 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except _BodyTooLarge:
            if not started:
                await self._too_large()(scope, receive, send)
        except Exception as error:  # noqa: BLE001 - one request fails, the server goes on
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                await error_response(500, f"internal error: {type(error).__name__}: {error}",
                                     "server_error")(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body over {self.options.max_body_bytes} bytes "
                              "(the server's --max-body-bytes)")

    def _refusal(self, scope) -> Optional[JSONResponse]:
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        key = self.options.api_key
        if key and path != "/health" and headers.get(b"authorization", b"").decode(
                "latin-1") != f"Bearer {key}":
            return error_response(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                  "authentication_error")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.options.max_body_bytes:
            return self._too_large()
        if path.startswith("/v1/") or path in _ENGINE_PATHS:
            engine = self.engine
            if engine.state == "loading":
                waited = time.monotonic() - engine.started
                return error_response(503, f"the model is loading ({waited:.0f} s so far): "
                                      "retry shortly", "service_unavailable")
            if engine.state != "ready":
                return error_response(503, f"the model failed to load: {engine.error}",
                                      "service_unavailable")
        return None


def create_app(engine: Engine, options: ServeOptions) -> FastAPI:
    app = FastAPI(title="danube", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, engine=engine, options=options)
    state = {"in_flight": 0}

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError):
        return validation_response(error)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, f"{error.detail}", "invalid_request_error")

    def check_model(name: str) -> None:
        if name != options.name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                           f"{options.name!r} (GET /v1/models)", "not_found_error", "model")

    def admit() -> None:
        if state["in_flight"] >= options.max_pending:
            raise ApiError(429, f"{state['in_flight']} requests in flight, the server's limit "
                           "(--max-pending): retry later", "rate_limit_error")
        state["in_flight"] += 1

    def release() -> None:
        state["in_flight"] -= 1

    async def answers(jobs: List[Job], request: Request) -> List[Result]:
        """The jobs' results, in order, holding one in-flight place meanwhile."""
        admit()
        try:
            return await asyncio.gather(*[_wait(engine, job, request) for job in jobs])
        finally:
            release()

    @app.get("/health")
    async def health():
        body = {"status": engine.state, "model": options.name, "in_flight": state["in_flight"],
                "running": engine.running, "waiting": engine.queue.qsize(),
                "largest_batch": engine.largest_batch}
        return JSONResponse(status_code=200 if engine.state == "ready" else 503, content=body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": options.name, "object": "model", "created": engine.created,
            "owned_by": "danube", "max_model_len": engine.im.config.max_position_embeddings}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = engine.im.tokenizer
        name = tok.hf.id_to_token
        return {"eos_token": name(tok.eos), "bos_token": name(tok.bos) if tok.bos is not None
                else None, "pad_token": name(tok.pad) if tok.pad >= 0 else None,
                "chat_template": engine.template.source,
                "model_max_length": engine.im.config.max_position_embeddings,
                "vocab_size": engine.im.vocab}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give prompt or messages")
        text = body.prompt if body.prompt is not None else _render(
            engine.template, body.messages, body.add_generation_prompt)
        ids = engine.im.tokenizer.tokenize(text)
        if body.add_special_tokens and engine.im.tokenizer.bos is not None:
            ids = [engine.im.tokenizer.bos] + ids
        return {"tokens": ids, "count": len(ids),
                "max_model_len": engine.im.config.max_position_embeddings}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        _check_ids(engine.im, body.tokens, "tokens")
        return {"prompt": engine.im.tokenizer.detokenize(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        im = engine.im
        from danube.inference.chat import chat_stops

        prompt = im.tokenizer.tokenize(_render(engine.template, body.messages, True))
        limit = body.max_completion_tokens or body.max_tokens
        max_tokens = _fit(im, len(prompt), limit,
                          "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        sampling = body.sampling(max_tokens)
        sampling.stop = chat_stops(engine.template, sampling.stop)
        top = body.top_logprobs or 0
        job = Job(prompt, max_tokens, sampling, logprobs=top if body.logprobs else None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": options.name}
        if body.stream:
            return _stream(engine, [job], admit, release, request, head, chat=True,
                           usage=bool(body.stream_options and body.stream_options.include_usage))
        (result,) = await answers([job], request)
        message = {"role": "assistant", "content": result.text}
        choice = {"index": 0, "message": message, "finish_reason": result.finish,
                  "logprobs": _chat_logprobs(im, job, result) if body.logprobs else None}
        return {**head, "object": "chat.completion", "choices": [choice],
                "usage": _usage([job], [result])}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        im = engine.im
        jobs = []
        for index, prompt in enumerate(body.prompts()):
            ids = im.tokenizer.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise ApiError(400, f"prompt {index}: empty (give at least one token)", "prompt")
            _check_ids(im, ids, "prompt")
            max_tokens = _fit(im, len(ids), body.max_tokens, "max_tokens")
            jobs.append(Job(ids, max_tokens, body.sampling(max_tokens), logprobs=body.logprobs,
                            echo=body.echo))
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": options.name}
        if body.stream:
            return _stream(engine, jobs, admit, release, request, head, chat=False,
                           usage=bool(body.stream_options and body.stream_options.include_usage))
        results = await answers(jobs, request)
        choices = []
        for index, (job, result) in enumerate(zip(jobs, results)):
            text = (im.tokenizer.detokenize(job.prompt) if job.echo else "") + result.text
            choices.append({"index": index, "text": text, "finish_reason": result.finish,
                            "logprobs": _completion_logprobs(im, job, result)
                            if job.logprobs is not None else None})
        return {**head, "object": "text_completion", "choices": choices,
                "usage": _usage(jobs, results)}

    return app


def _render(template, messages: List[ChatMessage], generation_prompt: bool) -> str:
    from danube.data.chat import ChatDataError

    try:
        return template.render([{"role": m.role, "content": m.text()} for m in messages],
                                    add_generation_prompt=generation_prompt)
    except ChatDataError as error:
        raise ApiError(400, f"messages: {error}", param="messages") from None
    except Exception as error:  # noqa: BLE001 - a template's raise_exception() and the like
        raise ApiError(400, f"messages: the chat template refused them: {error}",
                       param="messages") from None


def _check_ids(im: InferenceModel, ids: List[int], what: str) -> None:
    bad = [i for i in ids if not 0 <= i < im.vocab]
    if bad:
        raise ApiError(400, f"{what}: token ids outside the vocabulary [0, {im.vocab}): "
                       f"{bad[:5]}", param=what)


def _fit(im: InferenceModel, prompt_tokens: int, asked: Optional[int], name: str) -> int:
    """max_tokens for this prompt: as asked if prompt + it fits the context (400 otherwise),
    what is left of the context when not asked (the `max_tokens` cap)."""
    context = im.config.max_position_embeddings
    if asked is not None and asked > context:
        raise ApiError(422, f"{name}={asked} is over the model's context of {context} tokens",
                       param=name)
    room = context - prompt_tokens
    if asked is None:
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens, the model's context "
                           f"{context}: no room for an answer (shorten the messages)",
                           param="messages")
        return room
    if prompt_tokens + asked > context:
        raise ApiError(400, f"this model's context is {context} tokens; the request has "
                       f"{prompt_tokens} prompt tokens + {name}={asked}: shorten the prompt or "
                       f"lower {name}", param=name)
    return asked


async def _wait(engine: Engine, job: Job, request: Request) -> Result:
    """The job's result; a client that hangs up before it is ready cancels it (checked every
    quarter second: uvicorn tells a route only when asked)."""
    future = asyncio.wrap_future(engine.submit(job))
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                job.cancelled.set()
                log.info("client gone before its answer; cancelled")
                raise ApiError(499, "the client went away")
    except Cancelled:
        raise ApiError(499, "the request was cancelled") from None
    except InferenceError as error:
        raise ApiError(400, str(error)) from None
    except asyncio.CancelledError:
        job.cancelled.set()
        raise


def _usage(jobs: List[Job], results: List[Result]) -> dict:
    prompt = sum(len(j.prompt) for j in jobs)
    completion = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _token_text(im: InferenceModel, token: int) -> str:
    return im.tokenizer.detokenize([token])


def _completion_logprobs(im: InferenceModel, job: Job, result: Result) -> dict:
    """OpenAI's legacy completion logprobs over the echoed prompt (if echo) and the answer:
    per token its text, log-probability and the `logprobs` most likely alternatives (plus the
    token itself, as vLLM does); nothing for the very first token (it has no context)."""
    s = result.scores
    ids = job.prompt + result.tokens
    start = 0 if job.echo else len(job.prompt)
    tokens = [_token_text(im, t) for t in ids[start:]]
    top: List[Optional[dict]] = []
    for position in range(start, len(ids)):
        if s.top[position] is None:
            top.append(None)
            continue
        entries = {_token_text(im, t): lp for t, lp in s.top[position][: job.logprobs]}
        entries.setdefault(tokens[position - start], s.token_logprobs[position])
        top.append(entries)
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": s.token_logprobs[start:], "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(im: InferenceModel, job: Job, result: Result) -> dict:
    s = result.scores
    out = []
    for position in range(len(job.prompt), len(job.prompt) + len(result.tokens)):
        token = (job.prompt + result.tokens)[position]
        text = _token_text(im, token)
        out.append({"token": text, "logprob": s.token_logprobs[position],
                    "bytes": list(text.encode()),
                    "top_logprobs": [{"token": _token_text(im, t), "logprob": lp,
                                      "bytes": list(_token_text(im, t).encode())}
                                     for t, lp in (s.top[position] or [])[: job.logprobs]]})
    return {"content": out}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _stream(engine: Engine, jobs: List[Job], admit, release, request: Request, head: dict,
            chat: bool, usage: bool) -> StreamingResponse:
    admit()
    loop = asyncio.get_running_loop()
    events: "asyncio.Queue" = asyncio.Queue()
    for index, job in enumerate(jobs):
        job.on_text = (lambda i: lambda text: loop.call_soon_threadsafe(
            events.put_nowait, ("text", i, text)))(index)
        engine.submit(job).add_done_callback(
            (lambda i: lambda future: loop.call_soon_threadsafe(
                events.put_nowait, ("done", i, future)))(index))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: Optional[str], finish: Optional[str], first: bool = False):
        if chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text is not None else {})
            return {**head, "object": kind, "choices": [
                {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return {**head, "object": kind, "choices": [
            {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}]}

    results: Dict[int, Result] = {}
    ended = []

    def end() -> None:
        """Once, however the response ends: done, or the client gone (then also when it left
        before the first event, which the generator's `finally` never sees)."""
        if ended:
            return
        ended.append(True)
        if len(results) < len(jobs):
            for job in jobs:
                job.cancelled.set()
            log.info("%s: client gone after %d of %d answers; cancelled", head["id"],
                     len(results), len(jobs))
        release()

    async def body():
        try:
            if chat:
                yield _sse(chunk(0, None, None, first=True))
            while len(results) < len(jobs):
                what, index, value = await events.get()
                if what == "text":
                    yield _sse(chunk(index, value, None))
                    continue
                error = value.exception()
                if error is not None:
                    message = str(error) if isinstance(error, InferenceError) else (
                        f"{type(error).__name__}: {error}")
                    yield _sse({"error": {"message": message, "type": "server_error",
                                          "param": None, "code": 500}})
                    return
                results[index] = value.result()
                yield _sse(chunk(index, None, results[index].finish))
            if usage:
                order = sorted(results)
                yield _sse({**head, "object": kind, "choices": [],
                            "usage": _usage([jobs[i] for i in order],
                                            [results[i] for i in order])})
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away (the response task is cancelled)
            end()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"}, background=BackgroundTask(end))
