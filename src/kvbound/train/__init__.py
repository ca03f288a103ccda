"""Gate training: losses, data sources and the trainer."""
