-- The same column as the PostgreSQL catalog's (migrations/0007_agents_token.sql).
ALTER TABLE agents ADD COLUMN token_id TEXT NOT NULL DEFAULT '';
