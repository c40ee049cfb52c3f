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
    committed_at timestamptz NOT NULL DEFAULT now(),
    -- Set once the source has been dealt with after the commit:
    -- deleted | still_referenced
    cleaned_at   timestamptz,
    cleanup      text
);

CREATE INDEX IF NOT EXISTS moves_pending_idx
    ON relocator.moves (table_name, move_id) WHERE cleaned_at IS NULL;
CREATE INDEX IF NOT EXISTS moves_new_path_idx
    ON relocator.moves (table_name, new_path);
CREATE INDEX IF NOT EXISTS runs_job_idx
    ON relocator.runs (job, run_id);
