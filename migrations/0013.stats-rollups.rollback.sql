DROP TRIGGER review_summaries_counted_on_delete ON review_summaries;
DROP TRIGGER review_summaries_counted_on_update ON review_summaries;
DROP TRIGGER review_summaries_counted_on_insert ON review_summaries;
DROP TRIGGER review_summaries_of_conversation ON review_summaries;
DROP FUNCTION count_deleted_review_summaries();
DROP FUNCTION count_changed_review_summaries();
DROP FUNCTION count_inserted_review_summaries();
DROP FUNCTION rebuild_review_counts();
DROP FUNCTION fold_review_counts();
DROP FUNCTION add_review_counts(review_summaries[], review_summaries[]);
DROP FUNCTION review_summary_of_conversation();
DROP TABLE review_counts_daily;
DROP TABLE review_counts;
ALTER TABLE review_summaries DROP COLUMN model, DROP COLUMN provider, DROP COLUMN status;

DROP TRIGGER conversations_stats_on_delete ON conversations;
DROP TRIGGER conversations_stats_on_update ON conversations;
DROP TRIGGER conversations_stats_on_insert ON conversations;
DROP FUNCTION stats_deleted_conversations();
DROP FUNCTION stats_changed_conversations();
DROP FUNCTION stats_created_conversations();
DROP FUNCTION rebuild_conversation_stats();
DROP FUNCTION fold_conversation_stats();
DROP FUNCTION add_conversation_stats(conversation_stats_delta[]);
DROP FUNCTION conversation_stats_delta(conversations, integer, uuid);
DROP TYPE conversation_stats_delta;
DROP TABLE conversation_stats_daily;
DROP TABLE conversation_stats;
DROP FUNCTION stats_bin(double precision);

-- 0010's delete trigger as it was.
CREATE OR REPLACE FUNCTION count_deleted_conversations() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversation_counts AS counts
        (bucket, model, provider, status, writer, conversations)
    SELECT date_trunc('hour', created_at, 'UTC'), model, provider, status,
           coalesce(owner_id, '00000000-0000-0000-0000-000000000000'), -count(*)
    FROM old_rows GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (bucket, model, provider, status, writer)
    DO UPDATE SET conversations = counts.conversations + excluded.conversations;
    RETURN NULL;
END
$$;
