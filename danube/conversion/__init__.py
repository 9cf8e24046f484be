"""Hugging Face (Llama / Mistral) <-> danube checkpoints, exact and streaming."""


class ConversionError(ValueError):
    """Every reason a conversion cannot start, one per line (raised before anything is
    written)."""

    def __init__(self, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot convert:\n{lines}")
