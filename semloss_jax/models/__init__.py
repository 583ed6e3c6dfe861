"""Models: the Llama-family Flax model, its Hugging Face config mapping, weight loading and export
(safetensors, GGUF), the one model loader, the tokenizer and chat template, LoRA adapters, and
batched KV-cache generation."""
