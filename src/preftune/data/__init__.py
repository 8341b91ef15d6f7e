"""Preference data: load -> normalise -> tokenize -> collate (see DESIGN.md).

Importing this package is light: no torch, transformers or datasets until a function needs them.
"""

from preftune.data.load import LoadResult, load_examples
from preftune.data.records import (
    DataReport,
    PreferenceExample,
    TokenizedPair,
    TokenizedUnpaired,
    UnpairedExample,
)

# collate.py imports torch, so it is imported from preftune.data.collate, not from here.
from preftune.data.tokenize import encode_prompt, tokenize_pairs, tokenize_unpaired

__all__ = ["DataReport", "LoadResult", "PreferenceExample", "TokenizedPair", "TokenizedUnpaired", "UnpairedExample",
           "encode_prompt", "load_examples", "tokenize_pairs", "tokenize_unpaired"]
