"""Content-addressed blob storage for bundle archives."""
