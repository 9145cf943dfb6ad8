"""Graft's web tier: `core` (settings, errors), `db` (ORM models, sessions, migrations), `services` (the
work behind routes and pages; `lifecycle` makes every job status change, `access` decides who sees what),
`api` (the REST routes and their schemas) and `web` (the pages). Never imports torch."""
