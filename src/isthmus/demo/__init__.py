"""The README's main job (``make demo``): a small mesh run end to end on this machine."""
