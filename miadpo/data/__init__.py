"""Data: JSONL reading, image loading, the pair record, the pair dataset and its DataModule, the data report."""
