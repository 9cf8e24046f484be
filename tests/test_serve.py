"""launchers/serve.py, the OpenAI-compatible server, proven with real clients: the `openai`
package, lm-evaluation-harness's own `local-completions` backend, raw HTTP for the errors.
The server runs as a real process on a free localhost port; what needs an exact timing (503
while loading, 429 beyond the limit) runs the same app in this process with the engine held."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import CHAT, ROOT, free_port

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

NAME = "init"  # init_checkpoint's run name, what the server serves it as
QUESTION = CHAT[:2]  # system + user


class Server:
    def __init__(self, checkpoint: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "launchers" / "serve.py"), str(checkpoint), "--port",
             str(self.port), "--precision", "32", *extra],
            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("the server did not become ready:\n" + log.read_text())

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def post(self, path: str, body, **kwargs):
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json"}, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def server(init_checkpoint, tmp_path_factory):
    running = Server(init_checkpoint, tmp_path_factory.mktemp("serve") / "server.log",
                     "--max-batch", "8", "--max-body-bytes", "8192")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tokenizer(init_checkpoint):
    from danube.data.tokenizer import load_tokenizer

    return load_tokenizer(init_checkpoint / "tokenizer")


def _generate_launcher(checkpoint: Path, records: list, tmp_path: Path, *extra: str) -> list:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = subprocess.run([sys.executable, "launchers/generate.py", str(checkpoint), "--input",
                          str(source), "--output", str(out), "--precision", "32", *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_models_health_and_tokenizer_routes(server, tokenizer):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert server.health()["status"] == "ready"
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.hf.id_to_token(tokenizer.eos)
    ids = server.post("/tokenize", {"prompt": "def f(x):"}).json()["tokens"]
    assert ids == tokenizer.tokenize("def f(x):")
    assert server.post("/detokenize", {"tokens": ids}).json()["prompt"] == "def f(x):"


def test_chat_greedy_equals_the_generate_launcher_token_for_token(server, init_checkpoint,
                                                                  tokenizer, tmp_path):
    """The openai client's greedy chat completion == launchers/generate.py on the same
    messages: the text, and every token (logprobs carry the tokens' text, the launcher their
    ids)."""
    answer = server.client().chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=12, logprobs=True)
    expected = _generate_launcher(init_checkpoint, [{"messages": QUESTION}], tmp_path,
                                  "--max-new-tokens", "12")[0]
    choice = answer.choices[0]
    assert choice.message.content == expected["completion"]
    assert answer.usage.completion_tokens == expected["tokens"]
    assert [t.token for t in choice.logprobs.content] == [
        tokenizer.detokenize([t]) for t in expected["token_ids"]]
    assert choice.finish_reason == ("length" if expected["finish"] == "length" else "stop")
    from danube.data.chat import ChatTemplate

    rendered = ChatTemplate.for_tokenizer(tokenizer).render(QUESTION, add_generation_prompt=True)
    assert answer.usage.prompt_tokens == len(tokenizer.tokenize(rendered))


def test_streamed_chunks_make_the_non_streamed_answer(server):
    client = server.client()
    whole = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                           max_tokens=20)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    pieces = list(client.completions.create(model=NAME, prompt="def f(x):", max_tokens=10,
                                            temperature=0, stream=True))
    plain = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=10,
                                      temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


def test_seeded_sampling_repeats_and_seeds_differ(server):
    client = server.client()

    def sample(seed):
        return client.chat.completions.create(
            model=NAME, messages=QUESTION, temperature=1.0, top_p=0.95, max_tokens=16,
            seed=seed).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1


def test_lm_eval_local_completions_scores_as_the_native_backend(server, init_checkpoint,
                                                                tokenizer, megatron_world):
    """lm-evaluation-harness's own API backend (`local-completions`, remote tokenizer found
    through /tokenizer_info) pointed at the server: every request's log-likelihood equals our
    native backend's on the same checkpoint (< 1e-4 nats), and so does its greedy flag. With
    `max_length` = the context, lm-eval's API backend keeps one position for the token it asks
    for, so requests longer than context - 1 tokens are cut one token shorter than the native
    backend cuts them: those are left out of the comparison (counted)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from danube.evaluation.lm import DanubeLM
    from danube.evaluation.run import EVAL_TASKS_DIR
    from danube.inference.model import open_checkpoint

    manager = TaskManager(include_path=str(EVAL_TASKS_DIR), include_defaults=False)
    tasks, limit, context = ["arc_easy", "winogrande"], 10, 64

    def run(model, **kwargs):
        return simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager,
                               log_samples=True, num_fewshot=0, **kwargs)

    served = run("local-completions", model_args={
        "model": NAME, "base_url": server.url + "/v1/completions", "max_length": context,
        "batch_size": 4, "num_concurrent": 2, "max_retries": 1})
    with open_checkpoint(init_checkpoint, "32") as im:
        native = run(DanubeLM(im, batch_size=4))

    compared = longer = 0
    for task in tasks:
        for ours, theirs in zip(native["samples"][task], served["samples"][task]):
            assert ours["doc_id"] == theirs["doc_id"]
            for (context_text, continuation), a, b in zip(ours["arguments"], ours["resps"],
                                                          theirs["resps"]):
                if len(tokenizer.tokenize(context_text + continuation)) > context - 2:
                    longer += 1
                    continue
                assert abs(a[0][0] - b[0][0]) < 1e-4, (task, ours["doc_id"], a, b)
                assert a[0][1] == b[0][1]
                compared += 1
    assert compared >= 40 and compared > 2 * longer, (compared, longer)


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    chat = {"model": NAME, "messages": QUESTION, "max_tokens": 4}
    cases = [
        ({**chat, "tools": []}, 400, "tools"),                      # a field we do not know
        ({**chat, "max_tokens": "four"}, 400, "max_tokens"),        # the wrong type
        ("{not json", 400, None),
        ({**chat, "messages": [{"role": "user", "content": "x " * 80}]}, 400, "context"),
        ({**chat, "model": "gpt-4"}, 404, "gpt-4"),
        ({**chat, "temperature": -1}, 422, "temperature"),
        ({**chat, "n": 2}, 422, "n=2"),
        ({**chat, "temperature": 0.7, "top_k": 5, "top_p": 0.9}, 422, "top_k and top_p"),
        ({**chat, "frequency_penalty": 0.5}, 422, "frequency_penalty"),
        ({**chat, "max_tokens": 10_000}, 422, "context"),
        ({**chat, "messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
    ]
    for body, status, named in cases:
        response = server.post("/v1/chat/completions", body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"]
        if named:
            assert named in error["message"], (named, error)
    completion = {"model": NAME, "prompt": "def", "max_tokens": 2}
    for body, status, named in [
        ({**completion, "prompt": list(range(70))}, 400, "context"),
        ({**completion, "prompt": [10 ** 9]}, 400, "vocabulary"),
        ({**completion, "max_tokens": 0}, 422, "echo"),
        ({**completion, "suffix": "x"}, 400, "suffix"),
    ]:
        response = server.post("/v1/completions", body)
        assert response.status_code == status, (body, response.text)
        assert named in response.json()["error"]["message"]
    big = server.post("/v1/completions", {**completion, "prompt": "x" * 9000})
    assert big.status_code == 413 and "max-body-bytes" in big.json()["error"]["message"]
    assert server.post("/v1/nothing", {}).status_code == 404
    # still serving
    assert server.health()["status"] == "ready"
    ok = server.post("/v1/chat/completions", chat)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_concurrent_clients_get_their_own_answers_batched(server):
    """8 clients at once: each answer equals the same request sent alone, and the engine ran
    some of them together."""
    client = server.client()
    prompts = [f"def f{i}(x):" for i in range(8)]

    def ask(prompt):
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=12,
                                          temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    assert server.health()["largest_batch"]["generate"] == 1
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert server.health()["largest_batch"]["generate"] > 1


def test_a_wrong_checkpoint_fails_before_binding(tmp_path):
    run = subprocess.run([sys.executable, "launchers/serve.py", str(tmp_path / "nothing")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "is not a danube checkpoint" in run.stderr


# --- the gate, in this process: loading and the in-flight limit ------------------------------
def _asgi_client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_503_while_loading_then_ready(init_checkpoint, megatron_world):
    from danube.inference.model import open_checkpoint
    from danube.inference.server import Engine, ServeOptions, create_app

    release = threading.Event()

    def slow_load():
        release.wait(30)
        return open_checkpoint(init_checkpoint, "32")

    engine = Engine(slow_load, max_batch=4)
    app = create_app(engine, ServeOptions(name=NAME))
    engine.start()

    async def scenario():
        async with _asgi_client(app) as client:
            loading = await client.get("/health")
            refused = await client.post("/v1/completions",
                                        json={"model": NAME, "prompt": "x", "max_tokens": 1})
            release.set()
            assert engine.ready.wait(60)
            ready = await client.get("/v1/models")
            return loading, refused, ready

    try:
        loading, refused, ready = asyncio.run(scenario())
    finally:
        engine.stop()
    assert loading.status_code == 503 and loading.json()["status"] == "loading"
    assert refused.status_code == 503 and "loading" in refused.json()["error"]["message"]
    assert ready.status_code == 200 and ready.json()["data"][0]["id"] == NAME


def test_an_api_key_guards_every_route_but_health(init_checkpoint, megatron_world):
    from danube.inference.model import open_checkpoint
    from danube.inference.server import Engine, ServeOptions, create_app

    engine = Engine(lambda: open_checkpoint(init_checkpoint, "32"), max_batch=4)
    app = create_app(engine, ServeOptions(name=NAME, api_key="k3y"))
    engine.start()
    assert engine.ready.wait(60)

    async def scenario():
        async with _asgi_client(app) as client:
            return [await client.get("/v1/models"),
                    await client.get("/v1/models", headers={"Authorization": "Bearer nope"}),
                    await client.get("/v1/models", headers={"Authorization": "Bearer k3y"}),
                    await client.get("/health")]

    try:
        none, wrong, right, health = asyncio.run(scenario())
    finally:
        engine.stop()
    assert none.status_code == wrong.status_code == 401
    assert none.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200 and health.status_code == 200


def test_429_beyond_the_in_flight_limit(init_checkpoint, megatron_world):
    from danube.inference.model import open_checkpoint
    from danube.inference.server import Engine, ServeOptions, create_app

    engine = Engine(lambda: open_checkpoint(init_checkpoint, "32"), max_batch=4)
    hold = threading.Event()
    run = engine._run

    def held(group):
        hold.wait(30)
        run(group)

    engine._run = held
    app = create_app(engine, ServeOptions(name=NAME, max_pending=1))
    engine.start()
    assert engine.ready.wait(60)
    body = {"model": NAME, "prompt": "def", "max_tokens": 2, "temperature": 0}

    async def scenario():
        async with _asgi_client(app) as client:
            first = asyncio.create_task(client.post("/v1/completions", json=body, timeout=60))
            while engine.running == 0:
                await asyncio.sleep(0.01)
            second = await client.post("/v1/completions", json=body)
            hold.set()
            return await first, second

    try:
        first, second = asyncio.run(scenario())
    finally:
        engine.stop()
    assert second.status_code == 429 and "--max-pending" in second.json()["error"]["message"]
    assert first.status_code == 200


def test_a_client_gone_mid_stream_frees_its_place_and_stops_the_work(init_checkpoint,
                                                                     megatron_world):
    """uvicorn in a thread of this process, the model slowed to 50 ms a token: a client that
    hangs up after the first event, or before a non-streamed answer, frees its place at once
    and the generation stops (a few more forward passes, not the 60 asked for)."""
    import uvicorn

    from danube.inference.model import open_checkpoint
    from danube.inference.server import Engine, ServeOptions, create_app

    engine = Engine(lambda: open_checkpoint(init_checkpoint, "32"), max_batch=4)
    app = create_app(engine, ServeOptions(name=NAME))
    engine.start()
    assert engine.ready.wait(60)
    forwards = []

    def slow(_module, _args):
        forwards.append(time.monotonic())
        time.sleep(0.05)

    hook = engine.im.gpt.register_forward_pre_hook(slow)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def settled() -> dict:
        """/health once nothing is in flight or running (asserted within 2 s)."""
        deadline = time.monotonic() + 2
        while True:
            health = httpx.get(url + "/health").json()
            if health["in_flight"] == health["running"] == 0 or time.monotonic() > deadline:
                assert health["in_flight"] == 0 and health["running"] == 0, health
                return health
            time.sleep(0.02)

    try:
        while not server.started:
            time.sleep(0.05)
        body = {"model": NAME, "prompt": "def", "max_tokens": 60, "temperature": 0,
                "stream": True}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url + "/v1/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        break  # the first token, then hang up
        gone = time.monotonic()
        settled()
        assert time.monotonic() - gone < 1.5  # 60 tokens would take 3 s
        assert len(forwards) < 30, len(forwards)
        # a non-streamed request whose client gives up after 0.5 s: the same
        forwards.clear()
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        settled()
        assert len(forwards) < 30, len(forwards)
        quick = httpx.post(url + "/v1/completions", json={**body, "stream": False,
                                                          "max_tokens": 2})
        assert quick.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
        hook.remove()
        engine.stop()


def test_binding_beyond_localhost_is_said(init_checkpoint, monkeypatch, capsys):
    """127.0.0.1 by default; any other --host prints that the API is reachable from other
    machines (and, without --api-key, that nothing guards it). Nothing binds here."""
    import importlib.util

    import uvicorn

    from danube.inference import server as serving

    spec = importlib.util.spec_from_file_location("serve_launcher",
                                                  ROOT / "launchers" / "serve.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    bound = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: bound.append(self.config.host))
    monkeypatch.setattr(serving.Engine, "start", lambda self: None)
    monkeypatch.setattr(serving.Engine, "stop", lambda self: None)
    assert launcher.main([str(init_checkpoint)]) == 0
    assert "reachable" not in capsys.readouterr().out
    assert launcher.main([str(init_checkpoint), "--host", "0.0.0.0"]) == 0
    said = capsys.readouterr().out
    assert "reachable from other machines, without a key (add --api-key)" in said
    assert bound == ["127.0.0.1", "0.0.0.0"]


def test_a_real_instruct_model_served_answers_as_transformers(tmp_path):
    """A Llama-architecture model on Qwen 2.5's vocabulary with SmolLM2's ChatML template (real
    files from registry packages), imported, served: the openai client's greedy chat answer
    is transformers' `generate` on `apply_chat_template`'s ids, token for token, and ends at
    the model's own end of turn <|im_end|> (its LM head made to emit it third), not at the
    pretraining separator."""
    from tests.test_real_templates import TURNS, imported_model_ending_its_turn_third

    messages = TURNS[:1]
    prompt, theirs, tokenizer = imported_model_ending_its_turn_third(tmp_path, messages)

    served = Server(tmp_path / "ours", tmp_path / "server.log")
    try:
        answer = served.client().chat.completions.create(
            model="ours", messages=messages, temperature=0, max_tokens=12, logprobs=True)
        ids = served.post("/tokenize", {"messages": messages}).json()["tokens"]
    finally:
        served.stop()
    choice = answer.choices[0]
    assert ids == prompt and answer.usage.prompt_tokens == len(prompt)
    assert choice.finish_reason == "stop"
    assert [t.token for t in choice.logprobs.content] == [
        tokenizer.decode([t]) for t in theirs]
    assert choice.message.content == tokenizer.decode(theirs[:-1])


def test_the_scorer_keeps_its_memory_cap_and_scores_as_the_native_backend(
        init_checkpoint, megatron_world, monkeypatch):
    """score() (what echo/logprobs answer with): one row at a time under a tiny logits cap
    gives what a batch gives, and a continuation's summed log-probs equal the native lm-eval
    backend's for the same (context, continuation)."""
    from danube.evaluation.lm import DanubeLM
    from danube.inference import score as scoring
    from danube.inference.model import open_checkpoint

    texts = ["def f(x):\n    return x + 1", "What does `os.getcwd` do? It returns a string.",
             "Which module is it in?"]
    with open_checkpoint(init_checkpoint, "32") as im:
        seqs = [im.tokenizer.tokenize(t) for t in texts]
        assert all(len(s) > 4 for s in seqs)
        batched = scoring.score(im, seqs, top_n=2)
        monkeypatch.setattr(scoring, "MAX_LOGIT_ELEMENTS", 1)
        one_by_one = scoring.score(im, seqs, top_n=2)
        native = DanubeLM(im, batch_size=4)._score([(s[:3], s[3:]) for s in seqs])
    for a, b, (total, _) in zip(batched, one_by_one, native):
        assert a.token_logprobs[0] is None and a.top[0] is None
        assert max(abs(x - y) for x, y in zip(a.token_logprobs[1:], b.token_logprobs[1:])) < 1e-5
        assert abs(sum(a.token_logprobs[3:]) - total) < 1e-4
        assert all(top[0][1] >= lp for top, lp in zip(a.top[1:], a.token_logprobs[1:]))
