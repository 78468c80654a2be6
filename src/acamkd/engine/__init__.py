"""The training engine: the only place that knows models, data, methods and optimizers together."""
