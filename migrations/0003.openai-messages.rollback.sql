ALTER TABLE conversations DROP COLUMN messages, DROP COLUMN parameters;
