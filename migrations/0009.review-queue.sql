-- The review queue's random sample (issue 14): ended conversations in the order of a hash
-- of their id. A reviewer starts at a point of this order given by a hash of their name
-- and walks on, wrapping around: a fixed permutation, so nothing repeats, read by index
-- (ORDER BY random() would sort the whole slice on every page).
-- depends: 0007.reviews

CREATE INDEX conversations_review_sample_idx
    ON conversations ((uuid_hash_extended(id, 0)), id)
    WHERE status <> 'streaming';
