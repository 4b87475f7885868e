"""InternLM-XComposer-2.5 written for current transformers (issue 9, in progress: the high-resolution scheme)."""
