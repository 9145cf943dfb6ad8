"""Graft's torch-free core, shared by every tier: the run's parameters (`spec`), the backbone catalog
(`catalog`), the strategy advisor (`advice`), dataset folder layouts (`layout`), safe image opening
(`images`), evaluation metrics (`evaluate`), the engine's callback protocol (`callbacks`), typed results
(`results`) and the domain errors (`errors`).

Layers point down only: `domain` <- `worker.engine` (torch) and `app` (web), each on its own <- `worker`
(the bridge: queue + database <-> engine) <- `cli`. This package imports nothing from the others, and
never torch, the ORM, FastAPI or Celery (tests/test_boundaries.py checks it).
"""
