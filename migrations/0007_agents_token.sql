-- The API token an OpAMP agent is bound to: the one that registered it (or first spoke for a
-- pre-registered one). Messages for its instance_uid under another token are refused while
-- that token exists, so one host's ingest token cannot take over, or read the remote
-- configuration of, another host's agent. Empty: not bound yet (or authentication off).
ALTER TABLE agents ADD COLUMN token_id TEXT NOT NULL DEFAULT '';
