"""A small LLaMA-shaped checkpoint with *trained* weights, built here in a few minutes: for the
quantization checks that random weights cannot answer.

Random-init weights have no structure for a quantizer to keep: every logit is noise of the same
size, so int4's per-weight error shows up undamped (on the 0.49B random checkpoint of
``bench_export.py`` the logits' cosine to fp32 is about 0.91, the ONNX Runtime GenAI builder's
own int4 included). Trained weights are what users quantize. No trained weights ship in any
package installed here and nothing is downloaded, so this trains one: a byte-level language model
(vocabulary 256) on the source of Python's standard library, deterministic (seeded, one thread
count), saved as a transformers checkpoint directory (``config.json`` + ``model.safetensors``)
any loraformat command takes as a base.

    .venv/bin/python tools/build_trained_lm.py OUT [--steps 400] [--hidden 256] [--layers 4]

Then, e.g., ``tools/bench_decode.py --int4 OUT`` (fp32 against int4: logits cosine, greedy
agreement, decode speed). Needs ``transformers`` (a test dependency).
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np


def corpus(limit: int) -> np.ndarray:
    """The bytes of the standard library's top-level ``.py`` files, in name order, up to
    ``limit`` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    data = torch.from_numpy(corpus(8 * 1024**2).astype(np.int64))
    held_out = data[-65536:]
    data = data[:-65536]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.sequence - 1, (args.batch,),
                               generator=generator)
        batch = torch.stack([data[s:s + args.sequence] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  "
                  f"{time.perf_counter() - started:6.1f} s", file=sys.stderr)
    model.eval()
    with torch.no_grad():
        windows = held_out[: (len(held_out) // 512) * 512].view(-1, 512)[:16]
        held = model(input_ids=windows, labels=windows).loss.item()
    print(f"held-out loss {held:.3f} nats/byte ({held / math.log(2):.2f} bits/byte; "
          f"uniform is 8.00)")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
