"""lm-eval's own preprocessing for HellaSwag and WinoGrande (imported, not copied).

lm-eval applies `process_docs` on every access to a split (five times per run); the 10,042
HellaSwag documents are processed once per dataset here (a cache by fingerprint)."""

from lm_eval.tasks.hellaswag.utils import process_docs
from lm_eval.tasks.winogrande import preprocess_winogrande

winogrande_text = preprocess_winogrande.doc_to_text
winogrande_target = preprocess_winogrande.doc_to_target
winogrande_choice = preprocess_winogrande.doc_to_choice
_processed = {}


def hellaswag_docs(dataset):
    key = dataset._fingerprint
    if key not in _processed:
        _processed[key] = process_docs(dataset)
    return _processed[key]
