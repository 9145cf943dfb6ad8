"""Graft's worker side: the torch engine (`worker.engine`) and the bridge that joins it to the queue and the
database (`tasks`, `runjob`, `probejob`, `reaper`, `inference`)."""
