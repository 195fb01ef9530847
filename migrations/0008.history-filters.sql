-- The history's model filter (SPEC 9): the newest conversations of one model, by index.
-- Without it, `model=M` for a rare or absent model reads the whole history (~0.5 s at
-- 1,000,000 rows). Its cost: one more b-tree entry per conversation insert (one per
-- stream; the chunks, the streaming path's bulk, are untouched).
-- depends: 0007.reviews

CREATE INDEX conversations_model_newest_idx ON conversations (model, created_at DESC, id DESC);
