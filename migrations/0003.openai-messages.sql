-- Conversations that came through the OpenAI-compatible front door keep the whole
-- `messages` array they were asked with, and the sampling parameters passed upstream.
-- depends: 0002.search-statistics

ALTER TABLE conversations
    ADD COLUMN messages jsonb,
    ADD COLUMN parameters jsonb;
