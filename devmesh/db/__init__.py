"""Reserved for the database providers (native PostgreSQL, Docker, SQLite; a later issue);
empty until then so the layout of DESIGN.md and its import contracts hold from the start.
"""
