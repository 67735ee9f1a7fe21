"""Built-in data sets, written to disk in the LLaVA training format plus a VQA evaluation split:
the synthetic shapes scenes (`shapes`, `shapes_scene`) and the packaged easy-VQA (`easy_vqa`).

May import: what `vitune.data` may.
"""
