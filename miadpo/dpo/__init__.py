"""Reference-model DPO: batches, pair forwards, losses, the reference cache, the optimizer, the module, callbacks."""
