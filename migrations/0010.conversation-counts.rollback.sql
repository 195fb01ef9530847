DROP TRIGGER conversations_counted_on_insert ON conversations;
DROP TRIGGER conversations_counted_on_update ON conversations;
DROP TRIGGER conversations_counted_on_delete ON conversations;
DROP FUNCTION count_created_conversations();
DROP FUNCTION count_changed_conversations();
DROP FUNCTION count_deleted_conversations();
DROP TABLE conversation_counts;
