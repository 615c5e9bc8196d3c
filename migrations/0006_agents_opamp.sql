-- What OpAMP agents report beyond their description: their capabilities bits, the last
-- sequence number received (to notice a missed message), every description attribute (JSON
-- object), and the status of the remote configuration they were offered (JSON).
ALTER TABLE agents ADD COLUMN capabilities BIGINT NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN sequence_num BIGINT;
ALTER TABLE agents ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
ALTER TABLE agents ADD COLUMN remote_config_status TEXT NOT NULL DEFAULT '';
