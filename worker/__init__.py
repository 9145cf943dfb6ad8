"""Graft's worker side: the training engine (worker.engine) and, later, the bridge to the queue."""
