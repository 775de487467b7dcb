"""Data: reading/validating records, conversion, tokenization and statistics.

Importing this package does not import transformers, datasets or torch; tokenizers are
passed in as arguments and ``datasets`` is imported only to read a ``save_to_disk`` dir.
"""

from alignforge.data.convert import (
    ConvertReport,
    convert_file,
    convert_records,
    record_to_trl,
    write_jsonl,
)
from alignforge.data.readers import (
    KINDS,
    ReadResult,
    detect_kind,
    iter_json_objects,
    parse_hh,
    read_any,
    read_pointwise,
    read_preference,
    read_prompts,
    read_sft,
)
from alignforge.data.records import (
    PointwiseRecord,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    Source,
    TokenizedPair,
    TokenizedSFT,
)
from alignforge.data.stats import compute_stats, format_stats
from alignforge.data.tokenize import (
    DatasetReport,
    load_preference_dataset,
    load_sft_dataset,
    render,
    tokenize_messages,
    tokenize_preference,
    tokenize_prompt_completion,
    tokenize_sft,
    truncate_prompt_responses,
)

__all__ = [
    "KINDS",
    "ConvertReport",
    "DatasetReport",
    "PointwiseRecord",
    "PreferenceRecord",
    "PromptRecord",
    "ReadResult",
    "SFTRecord",
    "Source",
    "TokenizedPair",
    "TokenizedSFT",
    "compute_stats",
    "convert_file",
    "convert_records",
    "detect_kind",
    "format_stats",
    "iter_json_objects",
    "load_preference_dataset",
    "load_sft_dataset",
    "parse_hh",
    "read_any",
    "read_pointwise",
    "read_preference",
    "read_prompts",
    "read_sft",
    "record_to_trl",
    "render",
    "tokenize_messages",
    "tokenize_preference",
    "tokenize_prompt_completion",
    "tokenize_sft",
    "truncate_prompt_responses",
    "write_jsonl",
]
