"""Selection: the base model answers the augmented questions; its attention picks the rejected answers."""
