-- With default statistics the planner takes every search word for a common one: for a
-- rare word it walks the newest-first index and tests the whole table (seconds at a
-- million conversations). Finer statistics on the search vector let it pick the GIN
-- index for rare words (milliseconds). Autovacuum keeps them current from here on.
-- depends: 0001.conversations-and-chunks

ALTER TABLE conversations ALTER COLUMN search SET STATISTICS 10000;
ANALYZE conversations;
