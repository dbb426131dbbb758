"""A job's output files: listing with SHA-256, ranged downloads, and the whole checkpoint as a tar."""
