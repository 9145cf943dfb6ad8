"""The `graft` command line: the top layer, which may import every other (`domain`, `worker.engine`, `app`,
`worker`). Engine commands (`cli.engine`) import torch lazily, inside their bodies; server commands
(`cli.server`) import the web app and the worker bridge lazily, so `graft --help` stays fast."""
