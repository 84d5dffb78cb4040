"""Interoperability with other ecosystems' checkpoints (Hugging Face: ``lctrain.interop.hf``)."""
