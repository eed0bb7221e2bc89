-- Images imported while replicas share this database: each is pushed to the registry
-- they share (`berth server --image-registry`), and its name's digest is kept here so
-- every replica lists, resolves and removes it.

CREATE TABLE shared_images (
    name TEXT PRIMARY KEY NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    unpacked_bytes BIGINT NOT NULL,
    layers BIGINT NOT NULL,
    imported_at_ms BIGINT NOT NULL
);
