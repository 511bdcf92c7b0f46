-- A deleted application stays as a tombstone (its id is never handed out again, a late event of
-- it is recognised and dropped) while its tokens, chats, messages and search documents are
-- purged; its name is cleared. Reads leave it out.
ALTER TABLE applications ADD COLUMN deleted_at DATETIME(3) NULL;

-- counter-sync purges the applications deleted lately once more (an event lost, a late write).
CREATE INDEX applications_deleted_at ON applications (deleted_at);
