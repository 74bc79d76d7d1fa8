"""CNN backbones and fine-tuning (filled by the embedding issue; not imported by app/)."""
