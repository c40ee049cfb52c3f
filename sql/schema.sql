-- The application's table, as the demo and the tests create it.
CREATE TABLE IF NOT EXISTS avatars (
    id   serial PRIMARY KEY,
    path varchar
);
