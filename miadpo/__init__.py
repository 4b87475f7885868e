"""miadpo: multi-image augmented DPO for vision-language models (MIA-DPO, ICLR 2025), re-implemented.

The packages follow the pipeline (``README.md`` → Architecture has one line per stage):

- ``data``      the pair record, JSONL reading, image loading, the pair dataset and its DataModule
- ``augment``   single-image VQA records → Sequence / Grid Collage / Pic-in-Pic records
- ``select``    the base model answers; its attention picks the rejected answers → pair records
- ``dpo``       batches, pair forwards, losses, the reference cache, the optimizer, the LightningModule
- ``eval``      evaluation items and scoring
- ``models``    the model adapter interface and its families; ``toyworld`` the toy world and its base model
- ``pipeline``  the named stages ``miadpo.train`` composes; ``export`` the one way a model is written
- ``resume``    a run's config in its checkpoints: resuming from the checkpoint alone

Entry points: ``python -m miadpo.train | evaluate | sft | generate | merge | augment | select``.
"""
