"""Generate text from a danube checkpoint with megatron-core's inference engine (KV cache).

    python launchers/generate.py results/danube_tiny --prompt "def parse_args"
    python launchers/generate.py <ckpt> --input prompts.jsonl --output out.jsonl
    python launchers/generate.py results/danube_tiny_dpo --chat --prompt "What does os.getcwd do?"
    python launchers/generate.py results/danube_tiny_dpo --mt-bench --output answers.jsonl

--input: one JSON object per line, {"prompt": "..."} (raw text) or {"messages": [...]} (rendered
with the checkpoint's chat template; the answer also ends at the template's turn markers).
--output rows add "completion", "finish", "tokens" and "token_ids" (generated, EOS included).
Greedy by default; --temperature/--top-k/--top-p sample.
--mt-bench answers MT-Bench's 80 two-turn questions in FastChat's model_answer format.
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def main(argv=None) -> int:
    from danube.runtime import quiet_engine_notices

    quiet_engine_notices()
    from danube.inference.cli import add_sampling_arguments, sampling_from

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--input", type=Path, help="prompts JSONL")
    parser.add_argument("--output", type=Path, help="write results as JSONL")
    parser.add_argument("--chat", action="store_true",
                        help="treat each --prompt as a user turn (chat template)")
    parser.add_argument("--mt-bench", action="store_true", help="answer MT-Bench's questions")
    parser.add_argument("--limit", type=int, help="first N MT-Bench questions")
    parser.add_argument("--batch-size", type=int, default=8)
    add_sampling_arguments(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    sampling = sampling_from(args)
    records = [{"prompt": p} if not args.chat else {"messages": [{"role": "user", "content": p}]}
               for p in args.prompt]
    if args.input:
        if not args.input.is_file():
            parser.error(f"--input {args.input}: no such file")
        for number, line in enumerate(args.input.read_text().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    parser.error(f"{args.input}:{number}: not JSON ({error})")
                if not isinstance(record, dict) or not ({"prompt", "messages"} & set(record)):
                    parser.error(f'{args.input}:{number}: want {{"prompt": ...}} or '
                                 '{"messages": [...]}')
                records.append(record)
    if not records and not args.mt_bench:
        parser.error("nothing to do: give --prompt, --input or --mt-bench")
    if args.mt_bench and not args.output:
        parser.error("--mt-bench needs --output (FastChat's model_answer JSONL)")

    from danube.evaluation.mt_bench import mt_bench_answers
    from danube.inference.generate import generate
    from danube.inference.model import InferenceError, open_checkpoint

    try:
        with open_checkpoint(args.checkpoint, args.precision) as im:
            if args.mt_bench:
                count = mt_bench_answers(im, sampling, args.output, im.path.parent.parent.name,
                                         args.limit)
                print(f"{count} MT-Bench answers: {args.output}")
                return 0
            from danube.data.chat import ChatTemplate
            from danube.inference.chat import chat_stops

            template = ChatTemplate.for_tokenizer(im.tokenizer) if any(
                "messages" in r for r in records) else None
            prompts = [r["prompt"] if "prompt" in r else template.render(
                r["messages"], add_generation_prompt=True) for r in records]
            if template is not None:  # a chat answer also ends at the template's markers
                sampling = replace(sampling, stop=chat_stops(template, sampling.stop))
            results = generate(im, prompts, sampling, batch=args.batch_size)
    except InferenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = [{**record, "completion": r.text, "finish": r.finish, "tokens": len(r.tokens),
             "token_ids": r.tokens} for record, r in zip(records, results)]
    if args.output:
        args.output.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{len(rows)} completions: {args.output}")
    else:
        for prompt, row in zip(prompts, rows):
            print(f"{prompt}{row['completion']}\n[{row['finish']}, {row['tokens']} tokens]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
