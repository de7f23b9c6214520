"""How PEFT names what it saves, shared by the LoRA reader (:mod:`.peft`) and the variants
reader (:mod:`.peft_variants`), below both."""

from __future__ import annotations

import re

#: PEFT's prefix of every saved module name (the PeftModel wrapping the transformers model).
PREFIX = "base_model.model."


def get_pattern_key(pattern_keys: list[str], key_to_match: str) -> str:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first pattern (in dict order)
    that matches the end of the module name at a dot boundary, else the name itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


__all__ = ["PREFIX", "get_pattern_key"]
