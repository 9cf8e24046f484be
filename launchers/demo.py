"""The miniature Danube recipe, stage by stage (what `make demo` runs):

    python launchers/demo.py            # run every stage (each resumes, or does nothing if done)
    python launchers/demo.py --plan     # the stages and their commands; runs nothing

Every stage runs in fp32 unless `--precision` says otherwise: the configs' `auto` would pick
bf16 on CPUs with AVX512-BF16/AMX and fp32 on the others, two different runs, and the demo's
figures should be the same on every machine (fp32 on AVX2 and AVX512 kernels differs only by
rounding: pretraining and SFT validation losses within 0.03, DPO's within 0.07, the same chat
answer; docs/benchmarks.md).

Each stage is announced with what it is for and how much work it is, runs as the user would
run it (its own launcher, its own ETA line), and the end prints the summary table, where the
outputs are and what to try next.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RUNS = ["results/danube_tiny", "results/danube_tiny_sft", "results/danube_tiny_dpo"]

# (title, what it shows, the work, command)
STAGES = [
    ("Pretraining", "danube_tiny learns the embedded prose and code: the loss falls",
     "100 steps of 8 x 256 tokens (205k tokens; ETA on its own line)",
     [PY, "launchers/pretrain.py"]),
    ("SFT", "chat fine-tuning on the embedded instructions: the validation loss falls from "
     "the pretrained model's (step 0)",
     "48 steps of 8 conversations packed into 128-token rows", [PY, "launchers/sft.py"]),
    ("DPO", "preference tuning from the SFT model: from step 0's ln 2 = 0.693 and accuracy 0 "
     "(the policy is its reference there), the preference loss falls, the reward accuracy "
     "rises and the margin grows",
     "12 steps of 16 preference pairs", [PY, "launchers/dpo.py"]),
    ("Evaluation", "the DPO model on the H2O-Danube base suite (offline data): a table",
     "20 documents per task",
     [PY, "eval/evaluate.py", "results/danube_tiny_dpo", "--tasks", "danube_base",
      "--limit", "20"]),
    ("Chat", "one question to the DPO model (greedy): after 205k tokens of pretraining a 7M "
     "model has the answer's form, not its content (docs/benchmarks.md: what the demo's "
     "models learn)",
     "one answer of at most 24 tokens",
     [PY, "launchers/chat.py", "results/danube_tiny_dpo", "--max-new-tokens", "24"]),
    ("Plots", "the three runs' curves as PNG files", "seconds",
     [PY, "eval/plot.py", *RUNS, "--out", "results/plots"]),
]
CHAT_INPUT = "What does `os.getcwd` do?\n/exit\n"

NEXT = """Try next:
  python launchers/chat.py results/danube_tiny_dpo                    # talk to the model
  python eval/evaluate.py results/danube_tiny_dpo --tasks danube_base --limit 1000
                                                                      # more documents
  python conversion/hf_to_mcore.py <your HF model dir> converted/mine # fine-tune your own:
  python launchers/sft.py model.restore_from_path=converted/mine/checkpoint \\
      model.data.train_ds.file_path=<your.jsonl>                       # (README: bring your
                                                                      #  own model)"""


def banner(index: int, title: str, purpose: str, work: str) -> str:
    return f"\n[{index}/{len(STAGES)}] {title}: {purpose}\n      ({work})"


def with_precision(command: list, precision: str) -> list:
    """The stage's command with `precision` (auto: unchanged): a Hydra override for the
    training launchers, `--precision` for evaluation and chat, nothing for the plots."""
    if precision == "auto":
        return command
    script = command[1]
    if script in ("launchers/pretrain.py", "launchers/sft.py", "launchers/dpo.py"):
        return [*command, f"trainer.precision={'bf16-mixed' if precision == 'bf16' else 32}"]
    if script in ("eval/evaluate.py", "launchers/chat.py"):
        return [*command, "--precision", precision]
    return command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print the stages; run nothing")
    parser.add_argument("--precision", choices=["32", "auto", "bf16"], default="32",
                        help="every stage's precision (default 32: the same recipe on every "
                        "machine, so its figures are the ones in the docs; auto: the configs' "
                        "own choice, bf16 where the CPU multiplies it natively, faster there "
                        "but another run)")
    args = parser.parse_args()
    if args.plan:
        for index, (title, purpose, work, command) in enumerate(STAGES, 1):
            print(banner(index, title, purpose, work))
            command = with_precision(command, args.precision)
            print("      $ " + " ".join(Path(c).name if c == PY else c for c in command))
        return 0
    started = time.monotonic()
    for index, (title, purpose, work, command) in enumerate(STAGES, 1):
        command = with_precision(command, args.precision)
        print(banner(index, title, purpose, work), flush=True)
        stage_start = time.monotonic()
        run = subprocess.run(command, cwd=ROOT, input=CHAT_INPUT if title == "Chat" else None,
                             text=True)
        if run.returncode != 0:
            print(f"\n[{index}/{len(STAGES)}] {title} failed (exit {run.returncode}): see its "
                  "output above; running `make demo` again resumes where it stopped",
                  file=sys.stderr)
            return run.returncode
        print(f"      done in {time.monotonic() - stage_start:.0f} s", flush=True)
    print(f"\nThe recipe, every stage ({(time.monotonic() - started) / 60:.1f} min):")
    subprocess.run([PY, "launchers/summary.py", *RUNS], cwd=ROOT, check=True)
    print("\nOutputs: " + ", ".join(f"{r}/ (checkpoints, metrics.jsonl, config.yaml)"
                                    for r in RUNS) + ", results/plots/ (PNG curves)")
    print("\n" + NEXT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
