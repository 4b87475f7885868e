"""InternLM-XComposer-2.5, implemented here for current transformers (no hub remote code).

``hd.py`` the high-resolution crop scheme and image processor; ``internlm2.py`` the InternLM2 decoder with
Partial-LoRA; ``vision.py`` the vision path; ``modeling.py`` the whole model; ``checkpoint.py`` loading the
official weights by name; ``adapter.py`` the model adapter.
"""
