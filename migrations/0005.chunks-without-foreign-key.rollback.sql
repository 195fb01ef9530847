DELETE FROM chunks k WHERE NOT EXISTS (SELECT 1 FROM conversations c WHERE c.id = k.conversation_id);
ALTER TABLE chunks ADD CONSTRAINT chunks_conversation_id_fkey
    FOREIGN KEY (conversation_id) REFERENCES conversations (id) ON DELETE CASCADE;
