"""lm-eval's own preprocessing for HellaSwag and WinoGrande (imported, not copied)."""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_choice,
    doc_to_target as winogrande_target,
    doc_to_text as winogrande_text,
)
