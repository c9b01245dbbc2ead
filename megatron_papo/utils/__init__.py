"""Small shared utilities: rank-aware logging, progress bars, metric sinks."""
