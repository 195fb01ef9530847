DROP TABLE chunks;
DROP TABLE conversations;
