-- Version 2: images the Docker runtime pulled, so that only those are ever pruned.
-- `image`: the reference as pulled (`registry/name:tag`).
-- `image_id`: the engine's id of what the pull produced (`sha256:…`); pruning removes the
--   reference only while it still points at this id.
-- `last_used_at`: the last time a backend was prepared with the image (ms, drone clock).

CREATE TABLE docker_images (
    image TEXT PRIMARY KEY NOT NULL,
    image_id TEXT NOT NULL,
    pulled_at INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL
);
