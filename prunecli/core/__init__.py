"""Pure numerical and file-format core: no model forward passes, no CLI."""
