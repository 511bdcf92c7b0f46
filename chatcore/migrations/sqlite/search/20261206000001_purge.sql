-- The applications whose documents were purged (deleted applications): a late document of one is
-- never written again. The FTS5 index drops the purged documents too.
CREATE TABLE purged_applications (
    application_id INTEGER PRIMARY KEY
);

CREATE TRIGGER search_documents_deleted AFTER DELETE ON search_documents BEGIN
    INSERT INTO search_fts (search_fts, rowid, chat, body)
        VALUES ('delete', old.id, 'c' || old.application_id || 'x' || old.chat_number, old.body);
END;
