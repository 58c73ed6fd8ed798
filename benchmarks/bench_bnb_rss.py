"""Peak RSS of taking a bitsandbytes NF4-loaded model through ``memopt.optimize``, against loading the
same model in bf16 (the route a user had before: full 16-bit weights in RAM first).

A Llama of random weights (``--hidden``, ``--layers``) is saved once to a temporary directory; each
configuration then runs in its own process (so each peak is its own) and prints ``ru_maxrss``:

* ``bf16-load``: ``from_pretrained(dir, torch_dtype=bfloat16)``, nothing else;
* ``nf4-optimize``: ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(nf4, double quant))``
  then ``memopt.optimize(model, budget_gb=..., method="lora")`` on CPU.

    python benchmarks/bench_bnb_rss.py                 # hidden 512, 4 layers (~45 M parameters, 32k vocabulary)
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(kind: str, path: str) -> None:
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    if kind == "bf16-load":
        LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, device_map="cpu")
    else:
        import memopt

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                 torch_dtype=torch.bfloat16).train()
        ids = torch.randint(0, model.config.vocab_size, (1, 64))
        memopt.optimize(model, budget_gb=8, example_inputs={"input_ids": ids, "labels": ids}, device="cpu")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         max_position_embeddings=512)
    with tempfile.TemporaryDirectory() as path:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(path)
        del model
        print(f"Llama hidden {args.hidden}, {args.layers} layers: {params / 1e6:.0f} M parameters "
              f"({params * 2 / 2**20:.0f} MiB in bf16)")
        peaks = {}
        for kind in ("bf16-load", "nf4-optimize"):
            done = subprocess.run([sys.executable, __file__, "--child", kind, path], capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:])
                raise SystemExit(done.returncode)
            peaks[kind] = int(done.stdout.split()[-1])
            print(f"{kind:14s} peak RSS {peaks[kind] / 2**20:8.0f} MiB")
        print(f"nf4-optimize / bf16-load: x{peaks['nf4-optimize'] / peaks['bf16-load']:.2f}")


if __name__ == "__main__":
    main()
