"""The bottom layer: facts, architectures as data, the loaded model, deltas and their reversible application,
hooks, shared linear algebra, batching, key statistics, atomic file output, errors and the version."""
