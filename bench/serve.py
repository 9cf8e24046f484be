"""The OpenAI-compatible server's throughput: requests/s and generated tokens/s with 1, 4 and
16 concurrent clients, against the batch generation launchers/generate.py runs
(`danube.inference.generate.generate`, batch 16) on the same prompts in the same run.

    python bench/serve.py [results/danube_tiny_dpo] [--requests 32] [--max-tokens 32]

The server is started as a process (launchers/serve.py, --max-batch 16) on a free port; the
clients are the `openai` package, greedy chat completions of the embedded chat set's
validation questions. The anchor runs in this process after the server has answered, on the
same prompts (rendered with the same template) and max_tokens: the ratio is the server's
generated tokens/s over the anchor's. Prints a table (the CPU named) and, with --json, writes
the rows.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def questions(count: int) -> list:
    from danube.data.embedded_chat import held_out_questions

    asked = [question for question, _ in held_out_questions()]
    return [[{"role": "user", "content": asked[i % len(asked)]}] for i in range(count)]


def start_server(checkpoint: Path, port: int, precision: str) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen(
        [sys.executable, str(ROOT / "launchers" / "serve.py"), str(checkpoint), "--port",
         str(port), "--precision", precision, "--max-batch", "16"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited:\n" + process.stderr.read())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not become ready in 180 s")


def run_clients(port: int, name: str, conversations: list, clients: int, max_tokens: int):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=600)

    def ask(messages):
        answer = client.chat.completions.create(model=name, messages=messages, temperature=0,
                                                max_tokens=max_tokens)
        return answer.usage.completion_tokens, answer.choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(ask, conversations))
    return time.perf_counter() - start, answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path,
                        default=ROOT / "results" / "danube_tiny_dpo")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import httpx
    import torch

    from danube.inference.model import open_checkpoint, resolve_checkpoint
    from danube.runtime import cpu_capability

    checkpoint = resolve_checkpoint(args.checkpoint)
    conversations = questions(args.requests)
    port = free_port()
    server = start_server(checkpoint, port, args.precision)
    try:
        name = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        run_clients(port, name, conversations[:2], 1, 4)  # warm-up
        rows, served = [], {}
        for clients in (1, 4, 16):
            seconds, answers = run_clients(port, name, conversations, clients, args.max_tokens)
            tokens = sum(n for n, _ in answers)
            served[clients] = [text for _, text in answers]
            rows.append({"what": f"server, {clients} client(s)", "seconds": seconds,
                         "requests_per_s": len(answers) / seconds, "tokens": tokens,
                         "tokens_per_s": tokens / seconds})
    finally:
        server.terminate()
        server.wait(timeout=30)

    from dataclasses import replace

    from danube.inference.chat import chat_prompts
    from danube.inference.generate import Sampling, generate

    with open_checkpoint(checkpoint, args.precision) as im:
        prompts, sampling = chat_prompts(im, conversations,
                                         Sampling(max_new_tokens=args.max_tokens))
        generate(im, prompts[:2], replace(sampling, max_new_tokens=4), batch=2)  # warm-up
        start = time.perf_counter()
        results = generate(im, prompts, sampling, batch=16)
        seconds = time.perf_counter() - start
        precision = im.precision
    tokens = sum(len(r.tokens) for r in results)
    anchor = {"what": "generate(), batch 16 (launchers/generate.py)", "seconds": seconds,
              "requests_per_s": len(results) / seconds, "tokens": tokens,
              "tokens_per_s": tokens / seconds}
    same = all(served[c] == [r.text for r in results] for c in served)

    machine = (f"{cpu_capability()} CPU, {torch.get_num_threads()} threads, precision "
               f"{precision}, {args.requests} requests, max_tokens {args.max_tokens}")
    print(f"\n{checkpoint} on {machine}\n")
    print("| what | requests/s | generated tokens/s | vs generate() batch 16 |")
    print("|---|---|---|---|")
    for row in rows + [anchor]:
        print(f"| {row['what']} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} | "
              f"{row['tokens_per_s'] / anchor['tokens_per_s']:.2f}x |")
    print(f"\nserved answers == generate()'s at every concurrency: {same}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows, "anchor": anchor,
                                         "same_answers": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
