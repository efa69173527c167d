"""The worker process: fast start, control API, stage transport, consolidation, migration."""
