"""Databases for services: native PostgreSQL, SQLite, a staging subset sync, snapshots.

Why a driver package: a service that needs data gets its own database with no manual set-up,
so the agent must create, start, adopt, stop and drop databases as it does processes. The
drivers here are synchronous and blocking (psycopg, ``pg_ctl``, ``sqlite3``): every call is
short or is a long copy that holds no event loop, and the agent runs them in a worker thread
(``anyio.to_thread``) so the proxy never waits on them.

- ``spec``      the plain types: what a service asks for, what a provider answers, the
                ``Provider`` protocol every engine implements.
- ``wiring``    ``DATABASE_URL`` and libpq ``PG*`` values, URLs with the password hidden.
- ``pgbin``     find the machine's PostgreSQL binaries by major version.
- ``osuser``    which system user runs PostgreSQL when devmesh runs as root.
- ``cluster``   one native PostgreSQL cluster: initdb, start, adopt, stop.
- ``native``    the native provider: one cluster per project, a database and role per service.
- ``snapshots`` template-database snapshots for native PostgreSQL.
- ``container`` the docker provider: a PostgreSQL container per service database.
- ``sqlite``    the SQLite provider: a file per service.
- ``choose``    which provider ``auto`` means on this machine.
- ``subset``    which rows a staging subset holds (chosen rows and their foreign-key closure).
- ``sync``      copy that subset into a local database, all or nothing.
"""
