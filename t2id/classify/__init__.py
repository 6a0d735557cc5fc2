"""The classification track (run.task: classify): image-level labels through the same pipeline."""
