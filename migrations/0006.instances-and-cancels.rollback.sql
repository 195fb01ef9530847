ALTER TABLE conversations DROP COLUMN cancel_requested_at;
DROP TABLE instances;
