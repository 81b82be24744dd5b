"""The experiments: the paper's comparison in miniature (sweep), the preregistered study, their
plots. Each runs as `python -m experiments.<name>` from the repository's root."""
