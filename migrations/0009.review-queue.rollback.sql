DROP INDEX IF EXISTS conversations_review_sample_idx;
