"""Talk to a danube checkpoint: multi-turn, its chat template, tokens streamed as they come.

    python launchers/chat.py results/danube_tiny_dpo [--system "Be brief."] [--temperature 0.7]

Type a message and Enter. /reset starts over, /exit (or Ctrl-D) ends. Input may be piped:
`printf 'hello\\n/exit\\n' | python launchers/chat.py <ckpt>`; piped lines are echoed after
`you> `, so the output reads as the conversation.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from danube.runtime import quiet_engine_notices

    quiet_engine_notices()
    from danube.inference.cli import add_sampling_arguments, sampling_from

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    parser.add_argument("--system", default=None, help="system message")
    add_sampling_arguments(parser, max_new_tokens=256)
    args = parser.parse_args(argv)
    sampling = sampling_from(args)

    from danube.data.chat import ChatDataError
    from danube.inference.chat import ChatSession
    from danube.inference.model import InferenceError, open_checkpoint

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        with open_checkpoint(args.checkpoint, args.precision) as im:
            session = ChatSession(im, sampling, args.system)
            print(f"chatting with {im.path} (/reset, /exit)", flush=True)
            echo = not sys.stdin.isatty()  # piped input: the transcript shows what was asked
            while True:
                show("you> ")
                line = sys.stdin.readline()
                if not line:  # EOF
                    print()
                    break
                if echo:
                    show(line if line.endswith("\n") else line + "\n")
                text = line.strip()
                if text in ("/exit", "/quit"):
                    break
                if text == "/reset":
                    session.reset()
                    print("(conversation cleared)")
                    continue
                if not text:
                    continue
                show("danube> ")
                session.reply(text, on_text=show)
                print(flush=True)
                if session.dropped:
                    print(f"(the {session.dropped} oldest messages no longer fit the context "
                          "and were left out)", flush=True)
    except (InferenceError, ChatDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
