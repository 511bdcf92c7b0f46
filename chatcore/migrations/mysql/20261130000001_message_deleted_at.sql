-- A deleted message stays as a tombstone: its number is never handed out again, a late event of
-- it is recognised (and skipped), and its body is cleared. Reads and counts leave it out.
ALTER TABLE messages ADD COLUMN deleted_at DATETIME(3) NULL;
