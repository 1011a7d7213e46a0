"""SQL persistence (SQLAlchemy 2 async): SQLite embedded, PostgreSQL in production."""
