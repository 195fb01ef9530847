DROP TABLE deliveries;
ALTER TABLE conversations
    DROP COLUMN prompt_tokens,
    DROP COLUMN completion_tokens,
    DROP COLUMN tokens_estimated;
