-- Which flusher holds a row's lease. A worker leases each row it accepts to its own
-- flusher at insert time (and hands the row over in memory); its claims may then take
-- back its own leased rows, while other workers' claims skip them until the lease ends.
ALTER TABLE requests ADD COLUMN claimed_by TEXT;
