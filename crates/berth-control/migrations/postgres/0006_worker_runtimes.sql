-- The drivers each worker offers (comma-separated names), as it registered them. Empty
-- for a worker that registered before drivers were reported: it takes only Machines that
-- name none.

ALTER TABLE workers ADD COLUMN runtimes TEXT NOT NULL DEFAULT '';
