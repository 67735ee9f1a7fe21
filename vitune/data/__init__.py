"""Data: everything before the model sees a tensor.

Owns the tokenizer and chat templates (turn-by-turn rendering into ids + labels), the image
processor and collation, readers (LLaVA conversations, VQA evaluation files) with loud
validation, training sets and their batch order, shared-prefix packing, and the built-in data
sets (`data.builtin`: shapes scenes, easy-VQA).

May import: `vitune.config`, `vitune.files`. Never the model, checkpoints, training, inference,
evaluation or the CLI (tests/test_layout.py checks it).
"""
