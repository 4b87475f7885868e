"""InternLM-XComposer-2.5 for current transformers (issue 9, in progress).

Done: the HD crop scheme (hd.py), the InternLM2 decoder with Partial-LoRA (internlm2.py), the vision path
(vision.py). Still to come: the full model, the checkpoint loader, the adapter and its configs.
"""
