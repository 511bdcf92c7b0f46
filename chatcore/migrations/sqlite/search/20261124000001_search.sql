-- The embedded search index: the documents, and an FTS5 index over them kept in step by
-- triggers. `chat` is one token per chat, so a chat-scoped search intersects posting lists.
-- unicode61 lowercases and splits on word boundaries like Elasticsearch's standard analyzer;
-- prefix='2 3 4 5 6 7 8' stores word prefixes like the index_prefixes of the Elasticsearch mapping.
CREATE TABLE search_documents (
    id INTEGER PRIMARY KEY,
    application_id INTEGER NOT NULL,
    chat_number INTEGER NOT NULL,
    number INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    version INTEGER NOT NULL,
    UNIQUE (application_id, chat_number, number)
);

CREATE VIRTUAL TABLE search_fts USING fts5(
    chat,
    body,
    content = 'search_documents_view',
    content_rowid = 'id',
    tokenize = 'unicode61 remove_diacritics 0',
    prefix = '2 3 4 5 6 7 8'
);

CREATE VIEW search_documents_view AS
    SELECT id, 'c' || application_id || 'x' || chat_number AS chat, body FROM search_documents;

CREATE TRIGGER search_documents_inserted AFTER INSERT ON search_documents BEGIN
    INSERT INTO search_fts (rowid, chat, body)
        VALUES (new.id, 'c' || new.application_id || 'x' || new.chat_number, new.body);
END;

CREATE TRIGGER search_documents_updated AFTER UPDATE ON search_documents BEGIN
    INSERT INTO search_fts (search_fts, rowid, chat, body)
        VALUES ('delete', old.id, 'c' || old.application_id || 'x' || old.chat_number, old.body);
    INSERT INTO search_fts (rowid, chat, body)
        VALUES (new.id, 'c' || new.application_id || 'x' || new.chat_number, new.body);
END;
