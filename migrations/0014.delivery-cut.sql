-- `GET /history?delivered=incomplete` (SPEC 10): ended conversations to which no client
-- connection sent the final event, found by index at any size of the history.
--
-- `delivery_cut` is set when a delivery of the conversation is written ended without
-- the final event (client_left, dropped, lost) while none has sent it, and cleared when
-- one sends it (the writer's batches, recovery's `lost` sweep; never per chunk). It is a
-- hint kept exact within a process; across replicas a race can leave it set, so the
-- filter also checks the deliveries (history_filters.py). Why a column and not a join:
-- the page is the newest flagged ended conversations, read from the partial index below
-- (a few rows), where "no delivery has sent the end" alone is an anti-join over the
-- whole history. Rows from before deliveries were recorded (and seeded ones) have no
-- delivery at all: unknown, not flagged.
-- depends: 0012.usage-and-deliveries

-- A constant default: no table rewrite.
ALTER TABLE conversations ADD COLUMN delivery_cut boolean NOT NULL DEFAULT false;

-- Small: only cut-off conversations have an entry. Its predicate makes an update of
-- delivery_cut non-HOT, which is why the writer changes it only when it must.
CREATE INDEX conversations_delivery_cut_idx ON conversations (created_at DESC, id DESC)
    WHERE delivery_cut AND status <> 'streaming';
