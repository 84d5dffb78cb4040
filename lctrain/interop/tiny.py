"""``python -m lctrain.interop.tiny DIR``: a tiny random Hugging Face Llama (or Qwen2 / Mistral)
saved with ``save_pretrained``, to try the import -> extend -> export recipe without downloads.

    python -m lctrain.interop.tiny /tmp/tiny-llama --context 128
"""

from __future__ import annotations

import argparse

ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
         "mistral": ("MistralConfig", "MistralForCausalLM")}


def save_tiny(out_dir: str, family: str = "llama", context: int = 128, vocab: int = 300, seed: int = 0) -> None:
    """Random weights of a 2-layer, 64-wide model trained (nominally) at ``context`` tokens; the
    vocabulary covers lctrain's byte tokenizer so the built-in datasets run on it."""
    import torch
    import transformers

    config_cls, model_cls = ARCHS[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=vocab, hidden_size=64, intermediate_size=176,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=context)
    getattr(transformers, model_cls)(config).save_pretrained(out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=tuple(ARCHS), default="llama")
    parser.add_argument("--context", type=int, default=128, help="its max_position_embeddings")
    args = parser.parse_args(argv)
    save_tiny(args.out_dir, args.family, args.context)
    print(f"wrote a tiny random {args.family} to {args.out_dir} (context {args.context})")


if __name__ == "__main__":
    main()
