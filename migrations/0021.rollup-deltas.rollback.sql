-- Back to 0019's triggers. Dropping them first locks out writes to conversations until
-- the commit, so the fold below sees every delta there will be.
DROP TRIGGER conversations_stats_on_insert ON conversations;
DROP TRIGGER conversations_stats_on_update ON conversations;
SELECT fold_conversation_stats_pending(2147483647);

DROP FUNCTION rebuild_conversation_stats();
ALTER FUNCTION rebuild_conversation_stats_0017() RENAME TO rebuild_conversation_stats;
DROP VIEW conversation_stats_live;
DROP FUNCTION fold_conversation_stats_pending(integer);
DROP FUNCTION stats_created_conversations();
DROP FUNCTION stats_changed_conversations();
ALTER FUNCTION stats_created_conversations_0013() RENAME TO stats_created_conversations;
ALTER FUNCTION stats_changed_conversations_0019() RENAME TO stats_changed_conversations;
CREATE TRIGGER conversations_stats_on_insert AFTER INSERT ON conversations
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stats_created_conversations();
CREATE TRIGGER conversations_stats_on_update AFTER UPDATE ON conversations
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stats_changed_conversations();
DROP TABLE conversation_stats_pending;
