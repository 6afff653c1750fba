"""Model plumbing: loading checkpoints into transformers models, architecture adapters, the default demo model."""
