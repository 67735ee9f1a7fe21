"""Data: built-in data set generators (`shapes`, `easy_vqa`) and the VQA evaluation file format
(`vqa_format`). Readers that turn records into chat messages live beside them.
"""
