-- relocator's own bookkeeping, applied by relocator itself (idempotently) in its own
-- schema. The ledger rows of a batch are written in the same transaction as the rows'
-- rewrite, so the ledger can never disagree with the table.
CREATE SCHEMA IF NOT EXISTS relocator;

CREATE TABLE IF NOT EXISTS relocator.runs (
    run_id      bigserial PRIMARY KEY,
    -- Identifies the job (table, columns, source, dest, rewrite) so a rerun resumes it.
    job         text        NOT NULL,
    table_name  text        NOT NULL,
    source      text        NOT NULL,
    dest        text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    -- running | finished | interrupted | failed
    status      text        NOT NULL DEFAULT 'running',
    -- Keyset position: the last id of the last committed batch (text form of the id).
    last_id     text
);
-- Work is handed out as leases carved from two frontiers: phase 1 walks the source
-- listing (key ranges), phase 2 then sweeps the table by id (id ranges).
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS frontier text;
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS frontier_end boolean NOT NULL DEFAULT false;
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS key_frontier text;
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS key_frontier_end boolean NOT NULL DEFAULT false;

-- A lease: the range (lo, hi] of one run that one worker processes: source keys in
-- phase 1, ids in phase 2. A worker holds a
-- session advisory lock on its lease while alive, so a dead worker's lease is taken over
-- at once; a hung one's after its heartbeat expires. Rows are rewritten only by the
-- lease's current owner (checked in the rewrite's own statement).
CREATE TABLE IF NOT EXISTS relocator.leases (
    lease_id  bigserial PRIMARY KEY,
    run_id    bigint      NOT NULL REFERENCES relocator.runs (run_id),
    lo        text,        -- exclusive; NULL: from the first id
    hi        text,        -- inclusive; NULL: to the last id
    owner     text        NOT NULL,
    heartbeat timestamptz NOT NULL DEFAULT now(),
    last_id   text,        -- progress: the last id of the lease's last committed batch
    done      boolean     NOT NULL DEFAULT false
);
ALTER TABLE relocator.leases ADD COLUMN IF NOT EXISTS phase smallint NOT NULL DEFAULT 2;
CREATE INDEX IF NOT EXISTS leases_open_idx ON relocator.leases (run_id) WHERE NOT done;

-- With --rewrite, several sources may map to one destination key. Claims make the first
-- one win atomically even with many workers: (run, destination) is unique.
CREATE TABLE IF NOT EXISTS relocator.claims (
    run_id  bigint NOT NULL,
    dst_key text   NOT NULL,
    src_key text   NOT NULL,
    PRIMARY KEY (run_id, dst_key)
);

CREATE TABLE IF NOT EXISTS relocator.moves (
    move_id      bigserial PRIMARY KEY,
    run_id       bigint      NOT NULL REFERENCES relocator.runs (run_id),
    table_name   text        NOT NULL,
    row_id       text        NOT NULL,
    old_path     text        NOT NULL,
    new_path     text        NOT NULL,
    src_bucket   text        NOT NULL,
    dst_bucket   text        NOT NULL,
    -- true when relocator created the destination object (false: it was already there)
    copied       boolean     NOT NULL,
    lease_id     bigint,
    committed_at timestamptz NOT NULL DEFAULT now(),
    -- Set once the source has been dealt with after the commit:
    -- deleted | still_referenced
    cleaned_at   timestamptz,
    cleanup      text
);

ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS lease_id bigint;
CREATE INDEX IF NOT EXISTS moves_pending_idx
    ON relocator.moves (table_name, move_id) WHERE cleaned_at IS NULL;
CREATE INDEX IF NOT EXISTS moves_new_path_idx
    ON relocator.moves (table_name, new_path);
CREATE INDEX IF NOT EXISTS runs_job_idx
    ON relocator.runs (job, run_id);

-- Rollback (`relocator rollback`): a move is undone in the same statement that rewrites
-- its row back, then the new object is removed once nothing references it.
--   rollback: restored | changed_by_app (the row no longer held new_path; left alone)
--   rollback_cleanup: deleted | still_referenced | not_ours (relocator did not create it)
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS rolled_back_at timestamptz;
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS rollback text;
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS rollback_cleaned_at timestamptz;
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS rollback_cleanup text;
CREATE INDEX IF NOT EXISTS moves_rollback_pending_idx
    ON relocator.moves (table_name, move_id)
    WHERE rollback = 'restored' AND rollback_cleaned_at IS NULL;
-- The backup a run follows (`run --backup FILE`): file name, SHA-256, rows.
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS backup jsonb;
-- Why the run is waiting for the database's health (--max-replica-lag, autovacuum,
-- --max-wal-rate), and since when; NULL while it is not.
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS waiting text;
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS waiting_since timestamptz;
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS waiting_seen timestamptz;

-- The source's ETag the copy was made from: the source is deleted only while it still is
-- that object (an application may re-upload at the legacy key after the copy).
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS src_etag text;

-- Copies relocator made for rows the application changed before the commit. Written in
-- the commit's own statement; deleted (when nothing references them) only once the run
-- is finished, so no batch still in flight can have found the copy and relied on it.
CREATE TABLE IF NOT EXISTS relocator.take_backs (
    take_back_id bigserial PRIMARY KEY,
    run_id       bigint NOT NULL REFERENCES relocator.runs (run_id),
    dst_bucket   text   NOT NULL,
    dst_key      text   NOT NULL,
    src_etag     text,
    -- deleted | still_referenced | not_ours (the object is no longer relocator's copy)
    done_at      timestamptz,
    outcome      text,
    UNIQUE (run_id, dst_bucket, dst_key)
);

-- Destination keys a batch in flight may rely on (it copies there, or found an identical
-- object there), from before it looks until its commit. No delete of such a key happens
-- meanwhile (see cleanup.rs): a reservation and a delete serialise on an advisory lock per
-- bucket. `holder` names the batch; a reservation whose lease is done is void.
CREATE TABLE IF NOT EXISTS relocator.reservations (
    bucket   text   NOT NULL,
    key      text   NOT NULL,
    holder   text   NOT NULL,
    lease_id bigint NOT NULL,
    PRIMARY KEY (bucket, key, holder)
);
CREATE INDEX IF NOT EXISTS reservations_holder_idx ON relocator.reservations (holder);

-- Raised inside a batch's commit when the row holds another value than relocator wrote
-- (a trigger that rewrites NEW): the statement fails, and the row is found and reported
-- `rejected` (see commit.rs) instead of pointing at a key no object is at.
CREATE OR REPLACE FUNCTION relocator.refuse_stored(want text, got text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the table stored % instead of % (a trigger rewrote the value)', got, want
        USING ERRCODE = 'P0001';
END
$$;

-- The run's lease TTL (`--lease-ttl`), set by its first process and adopted by the others.
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS lease_ttl_secs bigint;
-- The other columns (--referenced-by) whose references keep this job's objects, as
-- SCHEMA.TABLE.COLUMN, quoted: every later process of the job honours them too.
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS referenced_by text[] NOT NULL DEFAULT '{}';


-- A batch notes each copy on its reservation of the key before it makes it (`creating`,
-- and the source ETag it copies), and withdraws the note when it did not make it after
-- all. A later batch of the same run that finds the object already there counts it as
-- relocator's copy (its commit records `copied`): the noting batch was killed, or lost its
-- lease, before its commit. When the reservation becomes void the note becomes a take-back.
ALTER TABLE relocator.reservations ADD COLUMN IF NOT EXISTS creating boolean NOT NULL DEFAULT false;
ALTER TABLE relocator.reservations ADD COLUMN IF NOT EXISTS src_etag text;

-- The destination object's identity as the move left it (its ETag and size): `verify`
-- compares the listing with it, and rollback and take-backs delete an object only while
-- it still is this one (a multipart copy's ETag is not the source's).
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS dst_etag text;
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS size bigint;
ALTER TABLE relocator.take_backs ADD COLUMN IF NOT EXISTS dst_etag text;

-- Multipart uploads relocator started and has not completed or aborted yet (see s3.rs,
-- `Uploads`): a killed attempt's upload is aborted by the next attempt on that key; any
-- other incomplete upload there (the application's) is never touched.
CREATE TABLE IF NOT EXISTS relocator.uploads (
    bucket     text        NOT NULL,
    key        text        NOT NULL,
    upload_id  text        NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, key, upload_id)
);

-- The source's version the copy was made from, in a versioned bucket: the copy names it
-- in its copy source, and the source is deleted only while it still is that version.
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS src_version text;

-- A delete checks whether rows of another table were moved onto the key (see cleanup.rs).
CREATE INDEX IF NOT EXISTS moves_dst_key_idx ON relocator.moves (dst_bucket, new_path);

-- Whether the lease's owner holds its advisory lock. A lease taken over from a hung
-- worker (heartbeat expired) may not get it while that worker lives: its liveness is then
-- judged by the heartbeat alone (see lease.rs, take_over).
ALTER TABLE relocator.leases ADD COLUMN IF NOT EXISTS locked boolean NOT NULL DEFAULT true;

-- A run's source listing, for a run that sweeps the table by id (no index on the path
-- column): its batches look their sources up here instead of a HEAD each. UNLOGGED: no
-- WAL, and emptied by a crash of the cluster, which the run notices (listed_keys > 0
-- and no rows) and lists again. Dropped when the run finishes.
CREATE UNLOGGED TABLE IF NOT EXISTS relocator.listed (
    run_id  bigint NOT NULL,
    key     text   NOT NULL,
    etag    text   NOT NULL,
    size    bigint NOT NULL,
    version text,
    PRIMARY KEY (run_id, key)
);
-- NULL: not listed; -1: given up (far more objects than rows); else the keys listed.
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS listed_keys bigint;
-- --service-column: {"column": ..., "buckets": {service: bucket}} as the run was given
-- them. A later job on the table that puts a service in another bucket is refused.
ALTER TABLE relocator.runs ADD COLUMN IF NOT EXISTS services jsonb;
-- What the row held before and after, where that is not the key itself (URL columns):
-- old_path and new_path are always the objects' keys; rollback's compare-and-swap is on
-- these values.
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS old_value text;
ALTER TABLE relocator.moves ADD COLUMN IF NOT EXISTS new_value text;
