DROP INDEX conversations_delivery_cut_idx;
ALTER TABLE conversations DROP COLUMN delivery_cut;
