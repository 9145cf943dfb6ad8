"""Graft's worker side: the torch engine (`worker.engine`) and the bridge that joins it to the queue and the
database: `tasks` (the Celery task), `runjob` (claim a job, then run it through the job-kinds table
`JOB_KINDS`: "train" here, "probe" in `probejob`, "label_issues" in `labeljob`), `attempt` (one claimed run: its reporter, heartbeat and
outcome), `reaper` (lost workers, lost messages) and `inference` (the prediction service). Every status
change goes through `app.services.lifecycle`."""
