"""MEND (Mitchell et al. 2022): trained gradient-transform networks (`networks`), their archive file (`archive`),
the editor applying them (`editor`) and their training (`train`)."""
