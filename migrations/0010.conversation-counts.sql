-- The history's counts by hour x model x provider x status, so the dashboard never counts
-- the conversations table (a scan that grows with the history).
--
-- Kept by statement-level triggers, in the transaction of every statement that creates,
-- ends or deletes conversations: the writer's batches, recovery sweeps, repairs, pruning,
-- and any SQL an operator runs by hand. Once per statement (a batch), never per chunk.
-- `writer` is the process whose rows changed (the row's owner before the change): each
-- replica adds to rows of its own and never waits on another's row locks. Rows of past
-- hours are folded into writer 0 (store.fold_counts). A row's count may be negative (a
-- stream created by one process, settled by another); the sum over writers is exact.
-- depends: 0007.reviews

CREATE TABLE conversation_counts (
    bucket timestamptz NOT NULL,  -- the UTC hour of created_at
    model text NOT NULL,
    provider text NOT NULL,
    status text NOT NULL,
    writer uuid NOT NULL,
    conversations bigint NOT NULL,
    PRIMARY KEY (bucket, model, provider, status, writer)
);

-- One function per statement kind: a transition table exists only where its trigger
-- declares it. The owner before the change names the writer (an end clears owner_id).
CREATE FUNCTION count_created_conversations() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversation_counts AS counts
        (bucket, model, provider, status, writer, conversations)
    SELECT date_trunc('hour', created_at, 'UTC'), model, provider, status,
           coalesce(owner_id, '00000000-0000-0000-0000-000000000000'), count(*)
    FROM new_rows GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (bucket, model, provider, status, writer)
    DO UPDATE SET conversations = counts.conversations + excluded.conversations;
    RETURN NULL;
END
$$;

CREATE FUNCTION count_changed_conversations() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversation_counts AS counts
        (bucket, model, provider, status, writer, conversations)
    SELECT date_trunc('hour', o.created_at, 'UTC'), s.model, s.provider, s.status,
           coalesce(o.owner_id, '00000000-0000-0000-0000-000000000000'), sum(s.delta)
    FROM old_rows o JOIN new_rows n USING (id)
    CROSS JOIN LATERAL (VALUES (o.model, o.provider, o.status, -1),
                               (n.model, n.provider, n.status, 1))
        AS s(model, provider, status, delta)
    -- Most updates (a cancel request, say) change none of the counted columns.
    WHERE (o.status, o.model, o.provider) IS DISTINCT FROM (n.status, n.model, n.provider)
    GROUP BY 1, 2, 3, 4, 5
    HAVING sum(s.delta) <> 0
    ON CONFLICT (bucket, model, provider, status, writer)
    DO UPDATE SET conversations = counts.conversations + excluded.conversations;
    RETURN NULL;
END
$$;

CREATE FUNCTION count_deleted_conversations() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER conversations_counted_on_insert AFTER INSERT ON conversations
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_created_conversations();
CREATE TRIGGER conversations_counted_on_update AFTER UPDATE ON conversations
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_changed_conversations();
CREATE TRIGGER conversations_counted_on_delete AFTER DELETE ON conversations
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_deleted_conversations();

-- What is there already.
INSERT INTO conversation_counts (bucket, model, provider, status, writer, conversations)
SELECT date_trunc('hour', created_at, 'UTC'), model, provider, status,
       '00000000-0000-0000-0000-000000000000', count(*)
FROM conversations
GROUP BY 1, 2, 3, 4;
