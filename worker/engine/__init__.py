"""The training engine: pure PyTorch, no web app, no ORM, no Celery.

Import the submodules you need; this package itself stays torch-free so that `spec` and
`errors` can be used by the web tier.
"""
