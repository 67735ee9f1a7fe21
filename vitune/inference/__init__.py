"""Inference: decoding (`generate`: greedy / top-p, KV cache, batches, shared prefixes,
streaming), a loaded model answering requests (`assistant`), and self-distilled text chats drawn
from a pretrained LM (`text_chat`).

May import: `vitune.config`, `vitune.presets`, `vitune.files`, `vitune.data`, `vitune.model`,
`vitune.checkpoints`.
"""
