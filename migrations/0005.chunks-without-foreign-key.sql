-- The writer's fence (store.insert_chunks) locks each conversation FOR SHARE, once per
-- batch, and inserts only chunks of rows it locked: that proves the row exists, where
-- the foreign key took a FOR KEY SHARE per inserted chunk (about 3 of 10 µs of
-- PostgreSQL CPU per chunk in batches of 100; benchmarks/insert_chunks.py). Its
-- ON DELETE CASCADE goes with it: store.delete_unconfirmed_conversations deletes
-- chunks itself, and nothing else deletes conversations.
-- depends: 0003.openai-messages

ALTER TABLE chunks DROP CONSTRAINT IF EXISTS chunks_conversation_id_fkey;
