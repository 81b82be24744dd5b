"""The experiments: the paper's comparison in miniature (sweep), the preregistered study, the
analysis of one run that both use (analyse), their shared process pool (runner) and plots.
Each tool runs as `python -m experiments.<name>` from the repository's root."""
