"""Speed and memory: selm's hot paths against the baselines a user would otherwise run
(`python -m perf.bench`), and how big a run fits where (`python -m perf.memory`)."""
