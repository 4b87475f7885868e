"""Toy world: procedurally generated scenes, a staged toy base model, and the end-to-end demonstration."""
