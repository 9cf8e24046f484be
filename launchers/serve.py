"""Serve a danube checkpoint behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

    python launchers/serve.py results/danube_tiny_dpo                 # http://127.0.0.1:8000/v1
    python launchers/serve.py <checkpoint | run dir> --port 8001 --max-batch 16
    python launchers/serve.py <ckpt> --host 0.0.0.0 --api-key "$KEY"  # reachable from others

Then any OpenAI client talks to it, e.g.
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "danube_tiny_dpo", "messages": [{"role": "user", "content": "Hi"}]}'
and lm-evaluation-harness scores it with `--model local-completions --model_args
model=danube_tiny_dpo,base_url=http://127.0.0.1:8000/v1/completions,max_length=<context + 1>`.
Routes, batching and errors: danube/inference/server.py; docs/evaluation.md, "Serving".
"""

import argparse
import logging
import os
import sys
from pathlib import Path


def served_name(checkpoint: Path) -> str:
    """The run's name (results/danube_tiny_dpo/checkpoints/step_00000012 -> danube_tiny_dpo),
    else the directory's own."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent.name
    if checkpoint.name == "checkpoint":  # conversion/hf_to_mcore.py's output
        return checkpoint.parent.name
    return checkpoint.name


def main(argv=None) -> int:
    from danube.runtime import quiet_engine_notices

    quiet_engine_notices()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint, run directory or imported "
                        "model (conversion/hf_to_mcore.py's output)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: this machine only; 0.0.0.0 = every "
                        "interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"])
    parser.add_argument("--max-batch", type=int, default=8,
                        help="requests run together in one engine call (default 8)")
    parser.add_argument("--max-pending", type=int, default=64,
                        help="requests in flight before new ones get 429 (default 64)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body (default 1 MiB; 413 beyond)")
    parser.add_argument("--served-model-name", help="the `model` clients send (default: the "
                        "run's name)")
    parser.add_argument("--api-key", default=os.environ.get("DANUBE_API_KEY"),
                        help="require `Authorization: Bearer <key>` (all routes but /health; "
                        "default: $DANUBE_API_KEY, which keeps the key out of `ps`)")
    args = parser.parse_args(argv)
    if args.max_batch < 1 or args.max_pending < 1 or args.max_body_bytes < 1024:
        parser.error("--max-batch and --max-pending >= 1, --max-body-bytes >= 1024")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: 0-65535")

    from danube.inference.model import InferenceError, open_checkpoint, resolve_checkpoint

    try:  # a wrong path fails here, before the server binds or anything loads
        checkpoint = resolve_checkpoint(args.checkpoint)
    except InferenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import uvicorn

    from danube.inference.server import Engine, ServeOptions, create_app

    name = args.served_model_name or served_name(checkpoint)
    engine = Engine(lambda: open_checkpoint(checkpoint, args.precision), args.max_batch)
    options = ServeOptions(name=name, max_batch=args.max_batch, max_pending=args.max_pending,
                           max_body_bytes=args.max_body_bytes, api_key=args.api_key)
    app = create_app(engine, options)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"binding {args.host}: the API is reachable from other machines"
              + ("" if args.api_key else ", without a key (add --api-key)"), flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def announce() -> None:
        engine.ready.wait()
        if engine.state == "ready":
            im = engine.im
            print(f"serving {name!r} ({checkpoint}, precision {im.precision}, context "
                  f"{im.config.max_position_embeddings}) on "
                  f"http://{args.host}:{args.port}/v1", flush=True)
        else:
            server.should_exit = True

    import threading

    print(f"loading {checkpoint} (requests get 503 until it is ready)", flush=True)
    engine.start()
    threading.Thread(target=announce, daemon=True).start()
    server.run()
    engine.stop()
    if engine.state == "failed":
        print(f"error: the checkpoint did not load: {engine.error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
