-- The volume's JSON as last answered by its create or update: what a recreate on another
-- worker makes it again from (name and flags) when its worker is lost.
ALTER TABLE volumes ADD COLUMN IF NOT EXISTS last_json TEXT;
