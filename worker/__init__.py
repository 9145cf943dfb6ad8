"""Graft's worker side: the torch engine (`worker.engine`) and the bridge that joins it to the queue and the
database: `tasks` (the Celery task), `runjob` (claim a job and run a training job), `probejob` (a backbone
comparison), `attempt` (one attempt's reporter, heartbeat and final writes, shared by both kinds), `reaper`
(lost workers, lost messages) and `inference` (the prediction service)."""
