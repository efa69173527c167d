"""Model storage: checkpoint reading and the pipeline-stage layout (torch-free)."""
