"""llama.cpp's own ``convert_hf_to_gguf.py`` run on a tiny checkpoint (F32), from the source tree
``LORAFORMAT_LLAMA_CPP_SRC`` names. The tiny checkpoints have no tokenizer, so every converter
class writes ``tokenizer.ggml.model = "no_vocab"`` instead of reading one (fed token ids)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: The converter modules (conversion/<name>.py) whose classes the tests use.
MODULES = ("base", "gpt2", "gpt_oss", "llama", "qwen")

SCRIPT = """
import importlib, sys
sys.path[:0] = [{src!r}, {src!r} + "/gguf-py"]
def no_vocab(self):
    self.gguf_writer.add_tokenizer_model("no_vocab")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
for name in {modules!r}:
    for value in vars(importlib.import_module("conversion." + name)).values():
        if isinstance(value, type) and "set_vocab" in vars(value):
            value.set_vocab = no_vocab
import convert_hf_to_gguf
sys.argv = ["convert", sys.argv[1], "--outfile", sys.argv[2], "--outtype", "f32"]
convert_hf_to_gguf.main()
"""


def convert_hf_to_gguf(src: str | Path, checkpoint: Path, out: Path) -> Path:
    """``checkpoint`` converted by llama.cpp (source tree ``src``) to ``out``."""
    script = SCRIPT.format(src=str(src), modules=MODULES)
    subprocess.run([sys.executable, "-c", script, str(checkpoint), str(out)],
                   check=True, capture_output=True)
    return out
