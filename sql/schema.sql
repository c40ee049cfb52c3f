-- The application's table, as the demo and the tests create it.
CREATE TABLE IF NOT EXISTS avatars (
    id   serial PRIMARY KEY,
    path varchar
);

-- relocator finds rows by key and checks references before deleting a source through an
-- index on the path column (without one it falls back to slower table scans).
CREATE INDEX IF NOT EXISTS avatars_path_idx ON avatars (path);
