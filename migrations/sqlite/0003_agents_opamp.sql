-- The same columns as the PostgreSQL catalog's (migrations/0006_agents_opamp.sql).
ALTER TABLE agents ADD COLUMN capabilities INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN sequence_num INTEGER;
ALTER TABLE agents ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
ALTER TABLE agents ADD COLUMN remote_config_status TEXT NOT NULL DEFAULT '';
