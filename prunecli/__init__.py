"""prunecli: sequential knowledge editing of LLM checkpoints with the PRUNE restraint, as shell steps."""

__version__ = "0.1.0"
