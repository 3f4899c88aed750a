-- Run once, as the service's own role, when devmesh creates the database.
CREATE TABLE notes (
    id serial PRIMARY KEY,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO notes (body) VALUES ('Hello from db/schema.sql');
