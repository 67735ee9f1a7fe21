"""Model: the modules of the data flow, from pixels and token ids to hidden states and the loss.

Owns the vision towers (ViT, CNN, the packaged EfficientNet-Lite0), the text encoder, the
connector, the Llama-family LM with its KV cache, attention helpers, LoRA, the loss, and the VLM
that wires them together (`vlm.VLM`).

May import: `vitune.config`, `vitune.files`. It does not know how it is saved or loaded
(`vitune.checkpoints` does), nor how it is trained or served.
"""
