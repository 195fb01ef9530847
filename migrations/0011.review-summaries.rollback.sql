DROP TRIGGER reviews_summarised_on_insert ON reviews;
DROP TRIGGER reviews_summarised_on_update ON reviews;
DROP TRIGGER reviews_summarised_on_delete ON reviews;
DROP FUNCTION summarise_inserted_reviews();
DROP FUNCTION summarise_changed_reviews();
DROP FUNCTION summarise_deleted_reviews();
DROP TABLE review_label_counts;
DROP TABLE review_summaries;
DROP INDEX reviews_review_sample_idx;
