"""Small shared helpers: atomic file writes, hashing, run directories, seeding."""
