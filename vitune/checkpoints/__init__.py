"""Checkpoints: models and training runs on disk.

Owns model folders (`model_folder`: config.json + safetensors + tokenizer), pretrained parts named
in the config (`pretrained`), imports from Hugging Face folders with explicit key maps
(`hf_import`, `hf_text`) and SmolLM2's GGUF conversion, export to transformers' LLaVA
(`export_hf`), LoRA merge of a folder (`merge`), and exact-resume training state
(`training_state`).

May import: `vitune.config`, `vitune.files`, `vitune.data`, `vitune.model`.
"""
