-- A document's sender (filterable), metadata (kept and returned, never searched) and the time of
-- its first edit. The sender is a column of the FTS5 index, one token of its bytes in hex (the
-- tokenizer would split an id like `user:42` into words), so a search for one sender intersects
-- posting lists as the chat's token does. An FTS5 table takes no new column: it is made again and
-- rebuilt from the documents (a one-time pass over them when a release before this one opens its
-- search.db).
ALTER TABLE search_documents ADD COLUMN sender TEXT;
ALTER TABLE search_documents ADD COLUMN metadata TEXT;
ALTER TABLE search_documents ADD COLUMN edited_at TEXT;

DROP TRIGGER search_documents_inserted;
DROP TRIGGER search_documents_updated;
DROP TRIGGER search_documents_deleted;
DROP TABLE search_fts;
DROP VIEW search_documents_view;

CREATE VIRTUAL TABLE search_fts USING fts5(
    chat,
    body,
    sender,
    content = 'search_documents_view',
    content_rowid = 'id',
    tokenize = 'unicode61 remove_diacritics 0',
    prefix = '2 3 4 5 6 7 8'
);

CREATE VIEW search_documents_view AS
    SELECT id, 'c' || application_id || 'x' || chat_number AS chat, body, lower(hex(sender)) AS sender
    FROM search_documents;

CREATE TRIGGER search_documents_inserted AFTER INSERT ON search_documents BEGIN
    INSERT INTO search_fts (rowid, chat, body, sender)
        VALUES (new.id, 'c' || new.application_id || 'x' || new.chat_number, new.body, lower(hex(new.sender)));
END;

CREATE TRIGGER search_documents_updated AFTER UPDATE ON search_documents BEGIN
    INSERT INTO search_fts (search_fts, rowid, chat, body, sender)
        VALUES ('delete', old.id, 'c' || old.application_id || 'x' || old.chat_number, old.body, lower(hex(old.sender)));
    INSERT INTO search_fts (rowid, chat, body, sender)
        VALUES (new.id, 'c' || new.application_id || 'x' || new.chat_number, new.body, lower(hex(new.sender)));
END;

CREATE TRIGGER search_documents_deleted AFTER DELETE ON search_documents BEGIN
    INSERT INTO search_fts (search_fts, rowid, chat, body, sender)
        VALUES ('delete', old.id, 'c' || old.application_id || 'x' || old.chat_number, old.body, lower(hex(old.sender)));
END;

INSERT INTO search_fts (search_fts) VALUES ('rebuild');
